"""What the benchmarks run against: a real sshd on 127.0.0.1 and the pueue stand-in behind it.

The same servers the tests use (tests/support), so that a figure here is a figure of the
code the tests check. The sshd logs every accepted login, so that connections are counted
at the server as well as by our own transport.
"""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import yaml

from mqi.settings import Settings
from tests.support.pueue_fixtures import FakePueue, install_fake_pueue
from tests.support.sshd import OpenSshServer

REMOTE_PYTHON = "/usr/bin/python3" if Path("/usr/bin/python3").exists() else "python3"


class CountingSshServer(OpenSshServer):
    """An sshd whose log names every accepted login."""

    def _write_files(self) -> Path:
        config = super()._write_files()
        config.write_text(config.read_text().replace("LogLevel ERROR", "LogLevel INFO"))
        return config

    def logins(self) -> int:
        return self.log_file.read_text(errors="replace").count("Accepted publickey")


@dataclass
class Lab:
    """A private sshd and pueue stand-in under one temporary folder."""

    root: Path
    sshd: CountingSshServer
    pueue: FakePueue

    def host(self, name: str, groups: dict[str, int]) -> dict:
        """A host entry of the settings: this sshd, this pueue, one pueue group per GPU group."""
        for group, slots in groups.items():
            self.pueue.add_group(group, slots)
        return {
            "name": name, "transport": "ssh", "queue": "pueue",
            "hostname": self.sshd.hostname, "port": self.sshd.port, "username": self.sshd.username,
            "key_file": str(self.sshd.key_file), "known_hosts": str(self.sshd.known_hosts),
            "pueue": str(self.pueue.bin), "workdir": str(self.root / "remote" / name),
            "groups": [{"name": group, "slots": slots} for group, slots in groups.items()],
        }  # fmt: skip

    def settings(self, folder: str, host: dict, *, inbox: dict | None = None, **case) -> Settings:
        base = self.root / folder
        return Settings(
            state_dir=base / ".mqi",
            results_dir=base / "results",
            ledger={"url": f"sqlite:///{base / 'mqi.db'}"},
            inbox={"path": base / "inbox", **(inbox or {})},
            case=case,
            hosts=[host],
        )

    def started_and_ended(self) -> dict[str, tuple[float, float]]:
        """(start, end) epoch seconds of each finished pueue task, by label."""
        times: dict[str, list[float]] = {}
        for record in self.pueue.task_history():
            times.setdefault(record["label"], []).append(record["time"])
        return {label: (pair[0], pair[1]) for label, pair in times.items() if len(pair) == 2}


@contextmanager
def lab(scratch: Path | None = None) -> Iterator[Lab]:
    root = Path(tempfile.mkdtemp(prefix="mqi-bench-", dir=scratch))
    (root / "sshd").mkdir()
    server = CountingSshServer(root / "sshd")
    server.start()
    pueue = install_fake_pueue(root / "pueue")
    pueue.start_daemon()
    try:
        yield Lab(root, server, pueue)
    finally:
        try:
            pueue.stop_daemon()
        finally:
            pueue.kill_leftover_tasks()
            server.stop()
            shutil.rmtree(root, ignore_errors=True)


def write_config(settings: Settings, path: Path) -> Path:
    """The settings as a YAML file another process (`mqi run`) can read."""
    data = settings.masked() | {"ledger": {"url": settings.ledger.url.get_secret_value()}}
    path.write_text(yaml.safe_dump(data))
    return path


def make_case(folder: Path, *, marker: str | None = None, files: int = 3) -> Path:
    """A small case folder. With `marker`, it appears in one rename, already marked ready."""
    staging = folder.with_name(folder.name + ".partial") if marker else folder
    (staging / "logs").mkdir(parents=True)
    (staging / "RTPLAN.dcm").write_bytes(b"DICM plan of " + folder.name.encode())
    for number in range(files - 1):
        (staging / "logs" / f"beam{number}.log").write_text("spot,mu\n1,0.5\n")
    if marker:
        (staging / marker).write_text("")
        os.rename(staging, folder)
    return folder


def wait_until(predicate: Callable[[], object], timeout: float, what: str, every: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


def timings(work: Callable[[int], object], runs: int) -> list[float]:
    """Seconds of each of `runs` calls of `work(run_number)`."""
    times = []
    for number in range(runs):
        started = time.perf_counter()
        work(number)
        times.append(time.perf_counter() - started)
    return times


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")
