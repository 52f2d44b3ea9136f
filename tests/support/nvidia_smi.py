"""An nvidia-smi stand-in: prints the real CSV of `--query-gpu` and `--query-compute-apps`
from a JSON file the test controls, and fails the way nvidia-smi does.

`install_fake_nvidia_smi(root)` writes an executable `root/bin/nvidia-smi` (a Python script
run with `-ES`, so this module imports nothing outside the standard library) with the state
file baked in, so it behaves the same locally and through SSH. Call it by absolute path: a
remote shell's PATH does not hold the test's folders.

The state: {"gpus": [{"index", "uuid", "name", "utilization.gpu", "memory.used",
"memory.total"}], "processes": [{"gpu_uuid", "pid", "process_name", "used_memory"}],
"failure": {"exit_code", "message"} | null}. A string value (e.g. "[N/A]") is printed as is.
Every call is appended to `calls.jsonl` beside the state file.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

SUPPORT_DIR = Path(__file__).resolve().parent
INVALID_ARGUMENTS = "Invalid combination of input arguments. Please run 'nvidia-smi -h' for help.\n"
EXIT_INVALID_ARGUMENT = 2
DRIVER_NOT_LOADED = (
    9,
    "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver. "
    "Make sure that the latest NVIDIA driver is installed and running.\n",
)

# field name (and aliases nvidia-smi accepts) -> (state key, header text, unit)
GPU_FIELDS = {
    "index": ("index", "index", ""),
    "uuid": ("uuid", "uuid", ""),
    "gpu_uuid": ("uuid", "uuid", ""),
    "name": ("name", "name", ""),
    "gpu_name": ("name", "name", ""),
    "utilization.gpu": ("utilization.gpu", "utilization.gpu [%]", "%"),
    "memory.used": ("memory.used", "memory.used [MiB]", "MiB"),
    "memory.total": ("memory.total", "memory.total [MiB]", "MiB"),
}
PROCESS_FIELDS = {
    "gpu_uuid": ("gpu_uuid", "gpu_uuid", ""),
    "pid": ("pid", "pid", ""),
    "process_name": ("process_name", "process_name", ""),
    "name": ("process_name", "process_name", ""),
    "used_memory": ("used_memory", "used_gpu_memory [MiB]", "MiB"),
    "used_gpu_memory": ("used_memory", "used_gpu_memory [MiB]", "MiB"),
}


def gpu(
    index: int, name: str = "NVIDIA A100-SXM4-40GB", utilization=0, used=0, total=40960
) -> dict:
    """One GPU of the state, with a stable UUID made from its index."""
    return {
        "index": index,
        "uuid": gpu_uuid(index),
        "name": name,
        "utilization.gpu": utilization,
        "memory.used": used,
        "memory.total": total,
    }


def gpu_uuid(index: int) -> str:
    return f"GPU-{index:08x}-1111-2222-3333-444455556666"


def process(gpu_index: int, pid: int, name: str = "/usr/bin/python3", used=1024) -> dict:
    return {"gpu_uuid": gpu_uuid(gpu_index), "pid": pid, "process_name": name, "used_memory": used}


def start_compute_process(*, ours: bool) -> subprocess.Popen:
    """A real, idle process to list as a GPU compute process. One of ours carries
    MQI_CASE_UID in its environment, as every task submitted for a case does."""
    env = {name: value for name, value in os.environ.items() if name != "MQI_CASE_UID"}
    if ours:
        env["MQI_CASE_UID"] = "case-under-test"
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], env=env)


def stop_processes(*processes: subprocess.Popen) -> None:
    for child in processes:
        child.kill()
        child.wait()


@dataclass
class FakeNvidiaSmi:
    bin: Path  # the executable (absolute path)
    state_file: Path

    def set_state(self, gpus: list[dict], processes: list[dict] = ()) -> None:
        self._write({"gpus": gpus, "processes": list(processes), "failure": None})

    def fail(self, exit_code: int, message: str) -> None:
        """Every call from now on prints `message` and exits with `exit_code`."""
        self._write({**self._read(), "failure": {"exit_code": exit_code, "message": message}})

    def calls(self) -> list[list[str]]:
        try:
            text = (self.state_file.parent / "calls.jsonl").read_text()
        except FileNotFoundError:
            return []
        return [json.loads(line)["argv"] for line in text.splitlines() if line]

    def _read(self) -> dict:
        return json.loads(self.state_file.read_text())

    def _write(self, state: dict) -> None:
        temporary = self.state_file.with_suffix(".tmp")
        temporary.write_text(json.dumps(state))
        temporary.replace(self.state_file)


def install_fake_nvidia_smi(
    root: Path, gpus: list[dict] = (), processes: list[dict] = ()
) -> FakeNvidiaSmi:
    root = Path(root).resolve()
    (root / "bin").mkdir(parents=True, exist_ok=True)
    executable = root / "bin" / "nvidia-smi"
    fake = FakeNvidiaSmi(bin=executable, state_file=root / "nvidia-smi.json")
    fake.set_state(list(gpus), list(processes))
    executable.write_text(
        f"#!{sys.executable} -ES\n"
        "import sys\n"
        f"sys.path.insert(0, {str(SUPPORT_DIR)!r})\n"
        "from nvidia_smi import main\n"
        f"sys.exit(main({str(fake.state_file)!r}, sys.argv[1:]))\n"
    )
    executable.chmod(0o755)
    return fake


# -- the stand-in itself ---------------------------------------------------------------------


def main(state_file: str, args: list[str]) -> int:
    state_path = Path(state_file)
    _record(state_path, args)
    state = json.loads(state_path.read_text())
    options = dict(_option(arg) for arg in args)
    if None in options or "--format" not in options or not _one_query(options):
        sys.stdout.write(INVALID_ARGUMENTS)
        return EXIT_INVALID_ARGUMENT
    formats = options["--format"].split(",")
    if "csv" not in formats or not set(formats) <= {"csv", "noheader", "nounits"}:
        sys.stdout.write(f'"{options["--format"]}" is not a valid format option.\n\n')
        return EXIT_INVALID_ARGUMENT
    if state.get("failure"):
        sys.stdout.write(state["failure"]["message"])
        return state["failure"]["exit_code"]
    if "--query-gpu" in options:
        return _print_csv(options["--query-gpu"], GPU_FIELDS, state["gpus"], formats)
    return _print_csv(options["--query-compute-apps"], PROCESS_FIELDS, state["processes"], formats)


def _option(arg: str) -> tuple[str | None, str]:
    name, equals, value = arg.partition("=")
    if equals and name in ("--query-gpu", "--query-compute-apps", "--format"):
        return name, value
    return None, arg


def _one_query(options: dict) -> bool:
    return ("--query-gpu" in options) != ("--query-compute-apps" in options)


def _print_csv(query: str, known: dict, rows: list[dict], formats: list[str]) -> int:
    names = query.split(",")
    for name in names:
        if name not in known:
            sys.stdout.write(f'Field "{name}" is not a valid field to query.\n\n')
            return EXIT_INVALID_ARGUMENT
    lines = [] if "noheader" in formats else [", ".join(known[name][1] for name in names)]
    for row in rows:
        lines.append(", ".join(_value(row, *known[name], "nounits" in formats) for name in names))
    sys.stdout.write("".join(line + "\n" for line in lines))
    return 0


def _value(row: dict, key: str, header: str, unit: str, no_units: bool) -> str:
    value = row[key]
    if isinstance(value, str) or no_units or not unit:
        return str(value)
    return f"{value} {unit}"


def _record(state_path: Path, args: list[str]) -> None:
    with open(state_path.parent / "calls.jsonl", "a") as calls:
        calls.write(json.dumps({"argv": args, "time": time.time()}) + "\n")
