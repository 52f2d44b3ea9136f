"""One `mqi run` per inbox and per ledger, with real processes holding the locks."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from mqi.instance_lock import LOCK_FILE_NAME, AlreadyRunning, RunLockError, hold_run_locks
from mqi.settings import Settings
from tests.support.databases import sqlite_url

SPAWN = multiprocessing.get_context("spawn")
WAIT_SECONDS = 60


def site_settings(inbox: Path, ledger_url: str) -> Settings:
    return Settings(inbox={"path": inbox}, ledger={"url": ledger_url}, timezone="Asia/Seoul")


def _hold_locks(inbox: str, ledger_url: str, ready: str, detached_child: bool) -> None:
    """In a child process: take the locks, start a detached command if asked, then wait to be killed."""
    with hold_run_locks(site_settings(Path(inbox), ledger_url)):
        note = {"pid": os.getpid()}
        if detached_child:
            # Like a case command of the local queue: its own session, outliving this process.
            command = subprocess.Popen(["sleep", "120"], start_new_session=True)
            note["detached_pid"] = command.pid
        Path(ready).write_text(json.dumps(note))
        time.sleep(WAIT_SECONDS * 2)


class LockHolder:
    """A real process holding the locks for `inbox` and `ledger_url`."""

    def __init__(self, tmp_path: Path, inbox: Path, ledger_url: str, *, detached_child: bool = False):
        ready = tmp_path / f"ready-{time.monotonic_ns()}.json"
        self.process = SPAWN.Process(target=_hold_locks, args=(str(inbox), ledger_url, str(ready), detached_child))
        self.process.start()
        deadline = time.monotonic() + WAIT_SECONDS
        while not ready.exists() or not ready.read_text():
            assert self.process.is_alive(), "the lock holder died before taking the locks"
            assert time.monotonic() < deadline, "the lock holder did not take the locks"
            time.sleep(0.05)
        self.note = json.loads(ready.read_text())

    def kill(self) -> None:
        os.kill(self.process.pid, signal.SIGKILL)  # no clean-up code runs
        self.process.join(WAIT_SECONDS)


@pytest.fixture
def holders():
    started: list[LockHolder] = []
    yield started
    for holder in started:
        if holder.process.is_alive():
            holder.kill()
        if "detached_pid" in holder.note:
            _kill_quietly(holder.note["detached_pid"])


def _kill_quietly(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    except (ProcessLookupError, ChildProcessError):
        pass


def test_second_run_on_the_same_inbox_is_refused_naming_the_holder(tmp_path, holders):
    inbox, url = tmp_path / "inbox", sqlite_url(tmp_path)
    holders.append(holder := LockHolder(tmp_path, inbox, url))
    with pytest.raises(AlreadyRunning) as refused:
        with hold_run_locks(site_settings(inbox, url)):
            pytest.fail("two runs held the same inbox")
    message = str(refused.value)
    assert message.startswith(f"another mqi run (pid {holder.process.pid} on host {socket.gethostname()} since ")
    assert f"holds the inbox {inbox}; stop it first" in message
    assert "+09:00" in message  # the start time in the configured time zone
    assert "command " in message
    assert (inbox / LOCK_FILE_NAME).stat().st_mode & 0o777 == 0o600


def test_another_inbox_on_the_same_ledger_is_refused(tmp_path, holders):
    url = sqlite_url(tmp_path)
    holders.append(LockHolder(tmp_path, tmp_path / "inbox-a", url))
    with pytest.raises(AlreadyRunning, match=r"holds the ledger .*ledger\.db; stop it first"):
        with hold_run_locks(site_settings(tmp_path / "inbox-b", url)):
            pass
    assert not (tmp_path / "inbox-b" / LOCK_FILE_NAME).read_bytes(), "the refused run kept its inbox"


def test_locks_of_a_killed_holder_do_not_block(tmp_path, holders):
    inbox, url = tmp_path / "inbox", sqlite_url(tmp_path)
    holders.append(holder := LockHolder(tmp_path, inbox, url, detached_child=True))
    holder.kill()
    assert holder.process.exitcode == -signal.SIGKILL
    assert (inbox / LOCK_FILE_NAME).read_bytes(), "the killed holder left its details behind"
    os.kill(holder.note["detached_pid"], 0)  # its detached command still runs...
    with hold_run_locks(site_settings(inbox, url)):  # ...and holds neither lock
        details = json.loads((inbox / LOCK_FILE_NAME).read_text())
        assert details["pid"] == os.getpid()
    assert (inbox / LOCK_FILE_NAME).read_bytes() == b""


def test_released_locks_can_be_taken_again(tmp_path):
    settings = site_settings(tmp_path / "inbox", sqlite_url(tmp_path))
    for _ in range(2):
        with hold_run_locks(settings):
            pass


@pytest.mark.parametrize("ledger_url", ["postgresql"], indirect=True)
def test_postgres_ledger_is_held_by_an_advisory_lock(tmp_path, holders, ledger_url):
    holders.append(holder := LockHolder(tmp_path, tmp_path / "inbox-a", ledger_url))
    other_inbox = site_settings(tmp_path / "inbox-b", ledger_url)
    with pytest.raises(AlreadyRunning) as refused:
        with hold_run_locks(other_inbox):
            pass
    message = str(refused.value)
    assert f"(mqi run pid {holder.process.pid} on {socket.gethostname()}, connected from 127.0.0.1 since" in message
    assert "holds the ledger postgresql" in message
    holder.kill()
    deadline = time.monotonic() + WAIT_SECONDS
    while True:  # the server ends the killed holder's session once it sees the socket closed
        try:
            with hold_run_locks(other_inbox):
                break
        except AlreadyRunning:
            assert time.monotonic() < deadline, "the killed holder's advisory lock was never released"
            time.sleep(0.1)


def test_unreachable_postgres_ledger_is_a_clear_error(tmp_path):
    url = "postgresql://mqi:secret-pw@127.0.0.1:1/ledger"
    with pytest.raises(RunLockError, match=r"cannot lock the ledger at postgresql\+psycopg://mqi:\*\*\*@") as raised:
        with hold_run_locks(site_settings(tmp_path / "inbox", url)):
            pass
    assert "secret-pw" not in str(raised.value)
    assert (tmp_path / "inbox" / LOCK_FILE_NAME).read_bytes() == b"", "the inbox lock was not released"
