"""Case transfer speed: our verified tar stream against OpenSSH `scp -r`, same sshd, same run.

Two data sets: one 200 MB file, and 2,000 files of 50 KB. Each is uploaded and downloaded
both ways to a private sshd on 127.0.0.1; every figure is the median of --repeat runs, ours
and scp taking turns.
Our transfer reuses its one SSH connection (that is the design: one connection per host per
process); scp opens a new one each time, so the time of `ssh host true` is printed too.

    .venv/bin/python benchmarks/bench_transfer.py [--repeat 3] [--big-mb 200] [--small 2000]
        [--scratch /dev/shm] [--python /usr/bin/python3]

--scratch puts the copies on another file system (tmpfs takes the disk out of the figures);
--python is the interpreter the host runs our receiver with (a pyenv shim costs ~0.1 s).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mqi.transfer import download_results, upload_case  # noqa: E402
from mqi.transport.ssh import SshTransport  # noqa: E402
from tests.support.sshd import OpenSshServer  # noqa: E402

TIMEOUT = 600


def make_data(root: Path, big_mb: int, small_count: int) -> dict[str, Path]:
    big = root / "big"
    big.mkdir()
    with (big / "one.bin").open("wb") as out:
        for _ in range(big_mb):
            out.write(os.urandom(1024 * 1024))
    small = root / "small"
    small.mkdir()
    for index in range(small_count):
        (small / f"spot_{index:05d}.dat").write_bytes(os.urandom(50 * 1024))
    return {f"one file of {big_mb} MB": big, f"{small_count} files of 50 KB": small}


def seconds(action: Callable[[], None]) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


class Bench:
    def __init__(self, server: OpenSshServer, scratch: Path, repeat: int, python: str):
        self.server = server
        self.python = python
        self.scratch = scratch
        self.repeat = repeat
        self.transport = SshTransport(**server.transport_params("bench"))
        self.transport.run(["true"], timeout=30).check()  # open the shared connection once

    def fresh(self, label: str) -> Path:
        path = self.scratch / label
        shutil.rmtree(path, ignore_errors=True)
        return path

    def scp(self, source: str, dest: str) -> None:
        subprocess.run(
            ["scp", "-q", "-r", "-P", str(self.server.port),
             *self.server.openssh_client_options(), source, dest],
            check=True,
        )  # fmt: skip

    def remote(self, path: Path) -> str:
        return f"{self.server.username}@{self.server.hostname}:{path}"

    def run_dataset(self, name: str, folder: Path) -> list[tuple[str, float, float]]:
        """Median times; ours and scp take turns, so a busy machine slows both alike."""
        actions = {
            "up-ours": lambda: upload_case(
                self.transport, folder, str(self.fresh("up-ours")),
                timeout=TIMEOUT, python=self.python,
            ),
            "up-scp": lambda: self.scp(str(folder), self.remote(self.fresh("up-scp"))),
            "down-ours": lambda: download_results(
                self.transport, str(folder), self.fresh("down-ours"),
                timeout=TIMEOUT, python=self.python,
            ),
            "down-scp": lambda: self.scp(self.remote(folder), str(self.fresh("down-scp"))),
        }  # fmt: skip
        times: dict[str, list[float]] = {label: [] for label in actions}
        for _ in range(self.repeat):
            for label, action in actions.items():
                times[label].append(seconds(action))
        median = {label: statistics.median(values) for label, values in times.items()}
        return [
            (f"upload {name}", median["up-ours"], median["up-scp"]),
            (f"download {name}", median["down-ours"], median["down-scp"]),
        ]

    def connection_cost(self) -> float:
        command = ["ssh", "-p", str(self.server.port), *self.server.openssh_client_options(),
                   f"{self.server.username}@{self.server.hostname}", "true"]  # fmt: skip
        return statistics.median(
            seconds(lambda: subprocess.run(command, check=True)) for _ in range(self.repeat)
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--big-mb", type=int, default=200)
    parser.add_argument("--small", type=int, default=2000)
    parser.add_argument("--scratch", type=Path, default=None)
    parser.add_argument("--python", default=_system_python())
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-transfer-") as temp:
        root = Path(temp)
        (root / "sshd").mkdir()
        (root / "data").mkdir()
        scratch = Path(tempfile.mkdtemp(prefix="bench-copies-", dir=args.scratch or root))
        server = OpenSshServer(root / "sshd")
        server.start()
        try:
            datasets = make_data(root / "data", args.big_mb, args.small)
            bench = Bench(server, scratch, args.repeat, args.python)
            rows = []
            for name, folder in datasets.items():
                rows += bench.run_dataset(name, folder)
            cipher = bench.transport._client.get_transport().remote_cipher
            print(f"\nmedian of {args.repeat} runs; our cipher: {cipher}; "
                  f"connections opened by us: {bench.transport.connections_opened}")  # fmt: skip
            print(f"{'':36} {'ours':>8} {'scp -r':>8} {'ours/scp':>9}")
            for label, ours, scp in rows:
                print(f"{label:36} {ours:7.2f}s {scp:7.2f}s {ours / scp:8.2f}x")
            print(f"(one new OpenSSH connection, `ssh host true`: {bench.connection_cost():.2f}s,"
                  " included in every scp figure)")  # fmt: skip
        finally:
            server.stop()
            shutil.rmtree(scratch, ignore_errors=True)


def _system_python() -> str:
    return "/usr/bin/python3" if Path("/usr/bin/python3").exists() else "python3"


if __name__ == "__main__":
    main()
