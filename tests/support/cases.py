"""Helpers for end-to-end case tests: case folders, settings, hosts, waiting."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from mqi.ledger.store import CaseNotFound
from mqi.runtime import use_settings
from mqi.settings import Settings

OUTPUT = "mkdir -p output && cp RTPLAN.dcm output/dose.dcm"


def make_case(root: Path, name: str) -> Path:
    folder = root / "inbox" / name
    (folder / "logs").mkdir(parents=True)
    (folder / "RTPLAN.dcm").write_bytes(b"DICM plan of " + name.encode())
    (folder / "logs" / "beam.log").write_text("spot,mu\n1,0.5\n")
    return folder


def settings_for(tmp_path: Path, hosts: list[dict], **case) -> Settings:
    return Settings(
        state_dir=tmp_path / ".mqi",
        results_dir=tmp_path / "results",
        ledger={"url": f"sqlite:///{tmp_path / 'mqi.db'}"},
        inbox={"path": tmp_path / "inbox", "quiet_seconds": 0},
        case={"poll_seconds": 0.2, **case},
        hosts=hosts,
    )


def start(settings: Settings):
    import tasks.publish  # noqa: F401 (its site hook repairs the GPU limits from the ledger)

    return use_settings(settings)


def unique_host(tmp_path: Path, prefix: str) -> str:
    # Prefect limits outlive a test in the shared server: each test gets its own host name.
    return f"{prefix}-{abs(hash(str(tmp_path))) % 10**8}"


def local_host(tmp_path: Path, groups=({"name": "gpu0", "slots": 1, "devices": "0"},)) -> dict:
    return {"name": unique_host(tmp_path, "local"), "transport": "local", "queue": "local",
            "workdir": str(tmp_path / "work"), "groups": list(groups)}


def ssh_host(tmp_path: Path, sshd, pueue, groups=({"name": "default", "slots": 1},)) -> dict:
    return {"name": unique_host(tmp_path, "gpu"), "transport": "ssh", "queue": "pueue",
            "hostname": sshd.hostname, "port": sshd.port, "username": sshd.username,
            "key_file": str(sshd.key_file), "known_hosts": str(sshd.known_hosts),
            "pueue": str(pueue.bin), "workdir": str(tmp_path / "remote"), "groups": list(groups)}


def run_case(folder: Path, **kwargs) -> str:
    from flows.process_case import process_case

    return process_case(case=str(folder), **kwargs)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split(") ")[1][0] != "Z"


def wait_for(predicate, timeout: float = 30.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def case_state(site, folder):
    """The state of the case registered from `folder`, or None before it is registered."""
    try:
        return site.ledger.find_case(str(folder)).state
    except CaseNotFound:
        return None


def mqi_listing_imports(args: list[str], cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    """`mqi ARGS` as a new process, with the modules it imported listed on stderr: a command the
    running main job answered never imports SQLAlchemy."""
    return subprocess.run([sys.executable, "-X", "importtime", "-m", "mqi.cli", *args],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=60)
