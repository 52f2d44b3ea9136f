"""The fake pueue (tests/support/fake_pueue) as a pytest fixture, plus helpers to inspect it.

`install_fake_pueue(root)` writes executable wrappers `root/bin/pueue` and `root/bin/pueued`
with the state directory baked in, so they behave the same when called locally or through SSH
on this machine, without any environment variable.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.fake_pueue.daemon import kill_leftover_process
from tests.support.fake_pueue.store import ACTIVE, UNRECORDED_CALL_VARIABLE, StateDir

PACKAGE_PARENT = Path(__file__).resolve().parent  # holds the fake_pueue package
DAEMON_START_TIMEOUT = 10.0


@dataclass
class FakePueue:
    root: Path
    bin: Path  # the `pueue` client wrapper (absolute path)
    daemon_bin: Path  # the `pueued` wrapper
    state_dir: Path
    _daemon: subprocess.Popen | None = None

    @property
    def store(self) -> StateDir:
        return StateDir(self.state_dir)

    # -- daemon ----------------------------------------------------------------------------
    def start_daemon(self) -> None:
        if self.store.daemon_running():
            raise RuntimeError(f"a fake pueued already runs for {self.state_dir}")
        with open(self.state_dir / "daemon.log", "ab") as output:
            self._daemon = subprocess.Popen(
                [str(self.daemon_bin)], stdout=output, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + DAEMON_START_TIMEOUT
        while self.store.daemon_pid() != self._daemon.pid:
            if self._daemon.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"fake pueued did not start; see {self.state_dir / 'daemon.log'}")
            time.sleep(0.01)

    def stop_daemon(self, *, graceful: bool = True) -> None:
        """Graceful: the daemon kills its tasks (recorded Killed). Else it dies like a crash,
        leaving its tasks running until the next daemon start kills them."""
        pid = self.store.daemon_pid()
        if pid is None or not self.store.daemon_running():
            return
        os.kill(pid, signal.SIGTERM if graceful else signal.SIGKILL)
        if self._daemon is not None and self._daemon.pid == pid:
            self._daemon.wait(timeout=DAEMON_START_TIMEOUT)
            self._daemon = None
        deadline = time.monotonic() + DAEMON_START_TIMEOUT
        while self.store.daemon_running():
            if time.monotonic() > deadline:
                raise RuntimeError(f"fake pueued (pid {pid}) did not stop")
            time.sleep(0.01)

    def restart_daemon(self, *, graceful: bool = True) -> None:
        self.stop_daemon(graceful=graceful)
        self.start_daemon()

    def kill_leftover_tasks(self) -> None:
        """Teardown after a crash-style stop: no task process may outlive the test."""
        for task in self.store.read()["tasks"].values():
            if task["status"] in ACTIVE:
                kill_leftover_process(task)

    # -- client ------------------------------------------------------------------------------
    def run(self, *args: str, env: dict | None = None, cwd: str | os.PathLike | None = None):
        """Run the fake client with these arguments (after `--color never`); recorded in calls()."""
        return subprocess.run(
            [str(self.bin), "--color", "never", *args],
            capture_output=True,
            text=True,
            env=env,
            cwd=cwd,
            timeout=30,
        )

    def _run_unrecorded(self, *args: str):
        return self.run(*args, env={**os.environ, UNRECORDED_CALL_VARIABLE: "1"})

    def status(self) -> dict:
        """The parsed `status --json` (not counted in calls())."""
        result = self._run_unrecorded("status", "--json")
        if result.returncode != 0:
            raise RuntimeError(f"pueue status failed: {result.stderr or result.stdout}")
        return json.loads(result.stdout.splitlines()[-1])  # v3 may print a warning line first

    def add_group(self, name: str, parallel: int = 1) -> None:
        self._checked("group", "add", name, "--parallel", str(parallel))

    def pause_group(self, name: str) -> None:
        self._checked("pause", "--group", name)

    def start_group(self, name: str) -> None:
        self._checked("start", "--group", name)

    def clean(self) -> None:
        self._checked("clean")

    def _checked(self, *args: str) -> None:
        result = self._run_unrecorded(*args)
        if result.returncode != 0:
            raise RuntimeError(f"pueue {shlex.join(args)} failed: {result.stdout}{result.stderr}")

    # -- settings ------------------------------------------------------------------------------
    def set_format(self, fmt: str) -> None:
        self.configure(format=fmt)

    def configure(self, **settings) -> None:
        """Change format, utc_offset_minutes, use_z, fraction_digits or version_mismatch."""
        self.store.write_settings({**self.store.settings(), **settings})

    # -- records ---------------------------------------------------------------------------------
    def calls(self) -> list[dict]:
        """Every client invocation but the fixture's own: {"argv": [...], "time": epoch seconds, "pid": n}."""
        return _read_records(self.store.calls_file)

    def task_history(self) -> list[dict]:
        """Task starts and ends in order: {"event": "start"|"end", "id", "label", "group", "time", ...}."""
        return _read_records(self.store.history_file)

    def max_concurrent(self, group: str) -> int:
        running = peak = 0
        for record in self.task_history():
            if record["group"] == group:
                running += 1 if record["event"] == "start" else -1
                peak = max(peak, running)
        return peak

    def idle_gaps(self, group: str) -> list[float]:
        """Seconds from each task end to the next task start in the group."""
        gaps, last_end = [], None
        for record in self.task_history():
            if record["group"] != group:
                continue
            if record["event"] == "end":
                last_end = record["time"]
            elif last_end is not None:
                gaps.append(record["time"] - last_end)
                last_end = None
        return gaps


def _read_records(path: Path) -> list[dict]:
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line]
    except FileNotFoundError:
        return []


def install_fake_pueue(
    root: Path,
    *,
    fmt: str = "v4",
    groups: dict[str, int] | None = None,
    python: str = sys.executable,
) -> FakePueue:
    """Create a fake pueue under `root` (daemon not started). `default` always exists."""
    root = Path(root).resolve()
    state_dir = root / "state"
    bin_dir = root / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    StateDir(state_dir).initialise({"default": 1, **(groups or {})}, {"format": fmt})
    wrappers = {}
    for program in ("pueue", "pueued"):
        wrapper = bin_dir / program
        wrapper.write_text(_wrapper_script(python, program, state_dir))
        wrapper.chmod(0o755)
        wrappers[program] = wrapper
    return FakePueue(root=root, bin=wrappers["pueue"], daemon_bin=wrappers["pueued"], state_dir=state_dir)


def _wrapper_script(python: str, program: str, state_dir: Path) -> str:
    # A Python script rather than a shell one: a shell would add PWD to the environment
    # that `pueue add` records. -ES: no site imports, PYTHON* variables ignored (fast start).
    return (
        f"#!{python} -ES\n"
        f"# fake {program} for tests, state in {state_dir}\n"
        "import sys\n"
        f"sys.path.insert(0, {str(PACKAGE_PARENT)!r})\n"
        "from fake_pueue.main import main\n"
        f"sys.exit(main({program!r}, {str(state_dir)!r}, sys.argv[1:]))\n"
    )


@pytest.fixture
def fake_pueue(tmp_path_factory) -> FakePueue:
    """A fake pueue with a running daemon (group `default`, 1 parallel task), v4 format."""
    pueue = install_fake_pueue(tmp_path_factory.mktemp("fake-pueue"))
    pueue.start_daemon()
    try:
        yield pueue
    finally:
        try:
            pueue.stop_daemon()
        finally:
            pueue.kill_leftover_tasks()
