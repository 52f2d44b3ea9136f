"""The state directory shared by the fake client and the fake daemon.

Layout of a state directory:
  state.json     tasks and groups (internal form, times as integer nanoseconds)
  state.lock     fcntl lock guarding state.json
  daemon.lock    held by the running daemon for its whole life: "is the daemon up?"
  pueue.pid      pid of the running daemon, named as pueue names its pid file
  settings.json  output format and timestamp style, chosen per instance
  task_logs/     one log file per task (stdout and stderr together)
  calls.jsonl    one record per client invocation
  history.jsonl  one record per task start and end
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import os
import time
from pathlib import Path

DEFAULT_SETTINGS = {
    "format": "v4",  # "v3" or "v4": the JSON the client prints
    "utc_offset_minutes": None,  # None: this machine's local offset; else a fixed offset
    "use_z": False,  # write "Z" instead of "+00:00" when the offset is zero
    "fraction_digits": 9,  # 0 to 9 digits of fractional seconds
    "version_mismatch": False,  # the client warns that the daemon has another version
}

# Set by the pytest fixture for its own helper calls, which tests should not count.
UNRECORDED_CALL_VARIABLE = "FAKE_PUEUE_UNRECORDED"
FINISHED = "Done"
ACTIVE = ("Running", "Paused")


def now_ns() -> int:
    return time.time_ns()


class StateDir:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.state_file = self.root / "state.json"
        self.state_lock = self.root / "state.lock"
        self.daemon_lock = self.root / "daemon.lock"
        self.pid_file = self.root / "pueue.pid"
        self.settings_file = self.root / "settings.json"
        self.log_dir = self.root / "task_logs"
        self.calls_file = self.root / "calls.jsonl"
        self.history_file = self.root / "history.jsonl"

    # -- creation and settings -------------------------------------------------
    def initialise(self, groups: dict[str, int], settings: dict) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(exist_ok=True)
        state = {
            "groups": {name: {"status": "Running", "parallel_tasks": n} for name, n in groups.items()},
            "tasks": {},
        }
        with self.transaction() as current:
            current.clear()
            current.update(state)
        self.write_settings({**DEFAULT_SETTINGS, **settings})

    def settings(self) -> dict:
        try:
            stored = json.loads(self.settings_file.read_text())
        except FileNotFoundError:
            stored = {}
        return {**DEFAULT_SETTINGS, **stored}

    def write_settings(self, settings: dict) -> None:
        unknown = set(settings) - set(DEFAULT_SETTINGS)
        if unknown:
            raise ValueError(f"unknown fake pueue settings: {sorted(unknown)}")
        if settings["format"] not in ("v3", "v4"):
            raise ValueError(f"format must be 'v3' or 'v4', not {settings['format']!r}")
        _write_atomically(self.settings_file, json.dumps(settings))

    # -- the state file ----------------------------------------------------------
    @contextlib.contextmanager
    def _locked(self, mode: int):
        with open(self.state_lock, "a") as lock:
            fcntl.flock(lock, mode)
            yield

    def read(self) -> dict:
        with self._locked(fcntl.LOCK_SH):
            return self._load()

    @contextlib.contextmanager
    def transaction(self):
        """The state for read-modify-write; saved (if changed) when the block ends without an error."""
        with self._locked(fcntl.LOCK_EX):
            before = self._load_text()
            state = json.loads(before)
            yield state
            after = json.dumps(state)
            if after != before:
                _write_atomically(self.state_file, after)

    def _load(self) -> dict:
        return json.loads(self._load_text())

    def _load_text(self) -> str:
        try:
            return self.state_file.read_text()
        except FileNotFoundError:
            return json.dumps({"groups": {}, "tasks": {}})

    # -- daemon presence --------------------------------------------------------
    def daemon_running(self) -> bool:
        """True while some process holds daemon.lock (the lock dies with its holder)."""
        if not self.daemon_lock.exists():
            return False
        with open(self.daemon_lock, "a") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            return False

    def write_pid_file(self, pid: int) -> None:
        _write_atomically(self.pid_file, str(pid))  # no newline, as pueue writes it

    def daemon_accepting(self) -> bool:
        """The daemon answers clients: pueue opens its socket only after restoring its state, and
        the fake daemon writes its pid file only then (removing a crashed daemon's first)."""
        return self.pid_file.exists() and self.daemon_running()

    def daemon_pid(self) -> int | None:
        try:
            return int(self.pid_file.read_text())
        except (FileNotFoundError, ValueError):
            return None

    def log_file(self, task_id: int) -> Path:
        return self.log_dir / f"{task_id}.log"

    # -- records for tests ---------------------------------------------------------
    def record_call(self, argv: list[str]) -> None:
        if os.environ.get(UNRECORDED_CALL_VARIABLE):
            return  # the fixture's own bookkeeping calls are not the code under test
        _append_line(self.calls_file, {"argv": argv, "time": time.time(), "pid": os.getpid()})

    def record_task_event(self, event: str, task: dict, **extra) -> None:
        record = {"event": event, "id": task["id"], "label": task["label"], "group": task["group"]}
        _append_line(self.history_file, {**record, "time": time.time(), **extra})


def _append_line(path: Path, record: dict) -> None:
    # One write() of a short line to an O_APPEND file: concurrent writers never interleave.
    line = (json.dumps(record) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def _write_atomically(path: Path, text: str) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


def rfc3339(ns: int | None, settings: dict) -> str | None:
    """A time as pueue prints it: local offset, a configurable number of fraction digits."""
    if ns is None:
        return None
    seconds, fraction = divmod(ns, 1_000_000_000)
    offset = settings["utc_offset_minutes"]
    if offset is None:
        moment = dt.datetime.fromtimestamp(seconds).astimezone()
    else:
        moment = dt.datetime.fromtimestamp(seconds, dt.timezone(dt.timedelta(minutes=offset)))
    text = moment.strftime("%Y-%m-%dT%H:%M:%S")
    digits = settings["fraction_digits"]
    if digits:
        text += "." + f"{fraction:09d}"[:digits]
    zone = moment.strftime("%z")
    if zone in ("+0000", "-0000") and settings["use_z"]:
        return text + "Z"
    return f"{text}{zone[:3]}:{zone[3:]}"
