"""Helpers for the fault-injection tests and the fault campaign (benchmarks/fault_campaign.py).

A case runs in a child `mqi submit` process against the session's Prefect server, so the
child shares the GPU limits the test inspects; the child dies by SIGKILL at a named crash
point (`mqi.faults`) or when the test sees a transfer under way. What the tests then check
is what an operator relies on: one remote task per attempt, no slot held, nothing partial
in the results, and a ledger that tells what happened.
"""

from __future__ import annotations

import hashlib
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import yaml

from mqi.faults import FAULT_POINT_VARIABLE
from mqi.settings import Settings

CHILD_START_TIMEOUT = 90.0  # a child imports Prefect and starts a flow run on a shared 2-CPU box


def write_config(tmp_path: Path, settings: Settings, prefect_api_url: str) -> Path:
    """A config file for child processes: these settings, with the real ledger URL, on our Prefect server."""
    data = settings.masked() | {"ledger": {"url": settings.ledger.url.get_secret_value()}}
    data["prefect"] = {**data.get("prefect", {}), "api_url": prefect_api_url}
    secrets = {h.name: h for h in settings.hosts}
    for host in data["hosts"]:  # masked() hides secrets: put the real ones back for the child
        real = secrets[host["name"]]
        for key in ("key_passphrase", "password"):
            value = getattr(real, key, None)
            host[key] = value.get_secret_value() if value is not None else None
    config = tmp_path / "mqi.yaml"
    config.write_text(yaml.safe_dump(data))
    return config


def spawn_submit(config: Path, folder: Path, *, crash_at: str | None = None) -> subprocess.Popen:
    """`mqi submit FOLDER` as a child in its own process group; it dies at `crash_at` if given."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.pop(FAULT_POINT_VARIABLE, None)
    if crash_at is not None:
        env[FAULT_POINT_VARIABLE] = crash_at
    log = open(config.parent / f"child-{folder.name[:40]}.log", "ab")  # noqa: SIM115 (kept by the child)
    return subprocess.Popen(
        [sys.executable, "-m", "mqi.cli", "--config", str(config), "submit", str(folder)],
        cwd=config.parent, stdout=log, stderr=log, env=env, start_new_session=True,
    )


def kill_child(child: subprocess.Popen) -> None:
    """SIGKILL the child's whole process group (it and any helper it started)."""
    try:
        os.killpg(child.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    child.wait(timeout=30)


def wait_for_death(child: subprocess.Popen, timeout: float = CHILD_START_TIMEOUT) -> int:
    """The child's exit status once it is gone; the test fails if it outlives `timeout`."""
    try:
        return child.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_child(child)
        log = "".join(p.read_text(errors="replace")[-3000:] for p in Path(child.args[3]).parent.glob("child-*.log"))
        raise AssertionError(f"the child did not reach its crash point in {timeout} s:\n{log}") from None


def partial_bytes(parent: Path, prefix: str) -> int:
    """Bytes received so far in hidden staging folders `parent/.<prefix>.mqi-partial-*`."""
    total = 0
    for staged in parent.glob(f".{prefix}.mqi-partial-*"):
        for path in staged.rglob("*"):
            try:
                total += path.stat().st_size if path.is_file() else 0
            except FileNotFoundError:
                pass  # renamed into place meanwhile
    return total


def kill_when_transfer_under_way(child: subprocess.Popen, parent: Path, prefix: str, *, min_bytes: int) -> int:
    """SIGKILL the child as soon as at least `min_bytes` of a transfer reached the staging folder."""
    deadline = time.monotonic() + CHILD_START_TIMEOUT
    while (received := partial_bytes(parent, prefix)) < min_bytes:
        if child.poll() is not None or time.monotonic() > deadline:
            kill_child(child)
            raise AssertionError(f"no transfer into {parent}/.{prefix}.* was seen under way")
        time.sleep(0.005)
    kill_child(child)
    return received


def staging_leftovers(parent: Path) -> list[Path]:
    return sorted(p for p in parent.glob(".*.mqi-*")) if parent.is_dir() else []


def tasks_labelled(fake_pueue, label: str) -> tuple[int, int]:
    """(tasks with this label in the queue now, task starts with this label ever)."""
    queued = sum(1 for t in fake_pueue.status()["tasks"].values() if t.get("label") == label)
    started = sum(1 for r in fake_pueue.task_history() if r["event"] == "start" and r["label"] == label)
    return queued, started


def active_slots(limit_name: str, api_url: str | None = None) -> int:
    """Slots Prefect counts as held on a global concurrency limit; `api_url`: of another server
    than the one this process is configured for (a job's embedded server)."""
    from prefect import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api_url} if api_url else {}):
        with get_client(sync_client=True) as client:
            return client.read_global_concurrency_limit_by_name(limit_name).active_slots


def tree_digest(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder`, by relative path."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@contextmanager
def sqlite_write_lock(database: Path, seconds: float) -> Iterator[subprocess.Popen]:
    """Another process holds an exclusive write lock on the SQLite file for `seconds`."""
    holder = subprocess.Popen(
        [sys.executable, "-c", _LOCK_HOLDER, str(database), str(seconds)],
        stdout=subprocess.PIPE, text=True,
    )
    assert holder.stdout.readline().strip() == "locked", "the lock holder could not lock the ledger"
    try:
        yield holder
    finally:
        holder.wait(timeout=seconds + 30)


_LOCK_HOLDER = """
import sqlite3, sys, time
connection = sqlite3.connect(sys.argv[1], isolation_level=None)
connection.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
connection.execute("COMMIT")
"""


def sqlite_tables(database: Path) -> dict[str, list[tuple]]:
    """Every row of every table of a SQLite file, for searching."""
    with sqlite3.connect(database) as connection:
        names = [r[0] for r in connection.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        return {name: connection.execute(f'SELECT * FROM "{name}"').fetchall() for name in names}


@contextmanager
def small_filesystem(mount_point: Path, size: str) -> Iterator[Path]:
    """A tmpfs of `size` (e.g. "2m") at `mount_point`, owner only: a real "No space left on device"."""
    mount_point.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(mount_point)], check=True)
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=True)
