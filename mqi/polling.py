"""One `pueue status` per host per poll interval, shared by every case waiting on that host.

Cases wait in threads of one process and in separate processes (a Prefect flow run may be
its own process), so the answer is shared through a cache file per host, `<host>.json` in
the cache folder, written atomically. A caller that finds no fresh answer takes an exclusive
lock on `<host>.lock` (flock: it excludes other processes and other open files in this one),
looks again, since the holder before it has probably just refreshed, and only then asks the
queue. A process keeps the parsed file in memory and re-reads it only when the file changes.

Errors of the status call are never written to the cache: the next caller asks again.
Threads of one `SharedStatus` that were already waiting while a call failed get that same
error instead of repeating the call one after another against a host that is down.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import fcntl
import json
import logging
import os
import re
import tempfile
import threading
import time
import types
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from mqi.errors import MqiError
from mqi.queue.base import GroupInfo, Queue, QueueSnapshot, TaskInfo
from mqi.transport.base import TransportError

log = logging.getLogger(__name__)

CACHE_FORMAT = 1
_SAFE_HOST = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass(frozen=True)
class _Loaded:
    """The cache file as last read by this process, and the identity of that file version."""

    file_key: tuple[int, int, int]
    taken_at: float
    snapshot: QueueSnapshot


class SharedStatus:
    """The latest status of one host's queue, at most `max_age` seconds old."""

    def __init__(
        self,
        queue: Queue,
        cache_dir: Path,
        max_age: float,
        *,
        clock: Callable[[], float] = time.time,
        on_call: Callable[[Exception | None], None] = lambda error: None,
        on_snapshot: Callable[[QueueSnapshot, float, float], None] = lambda snapshot, asked, answered: None,
    ):
        """`on_call` hears the outcome of every real status call (None: it succeeded);
        `on_snapshot` gets the answer of every one that succeeded, with the clock's times when
        the call was made and answered."""
        if not _SAFE_HOST.match(queue.host):
            raise ValueError(f"host name {queue.host!r} cannot name a cache file")
        self.queue = queue
        self.max_age = max_age
        self._clock = clock
        self._on_call = on_call
        self._on_snapshot = on_snapshot
        cache_dir.mkdir(parents=True, exist_ok=True)
        self._cache_file = cache_dir / f"{queue.host}.json"
        self._lock_file = cache_dir / f"{queue.host}.lock"
        self._loaded: _Loaded | None = None
        self._refreshing = threading.Lock()
        self._attempts = 0
        self._last_error: Exception | None = None

    def snapshot(self) -> QueueSnapshot:
        """A snapshot younger than `max_age`; asks the queue only when nobody has one."""
        fresh = self._fresh_cached()
        if fresh is not None:
            return fresh
        attempts_before_waiting = self._attempts
        with self._refreshing:
            if self._attempts != attempts_before_waiting and self._last_error is not None:
                raise self._last_error
            fresh = self._fresh_cached()
            if fresh is not None:
                return fresh
            with self._host_lock():
                fresh = self._fresh_cached()
                if fresh is not None:
                    return fresh
                return self._refresh()

    def seconds_until_stale(self) -> float:
        """How long the snapshot at hand stays fresh: a waiter that checks again then sees a
        new one (0 when there is none)."""
        loaded = self._read_cache_file()
        if loaded is None:
            return 0.0
        return min(self.max_age, max(0.0, loaded.taken_at + self.max_age - self._clock()))

    def invalidate(self) -> None:
        """Make the next read, in any process, ask the queue (after a submit or a kill)."""
        # Under the lock so that a refresh started before our change cannot be stored after it.
        with self._host_lock():
            self._cache_file.unlink(missing_ok=True)
            self._loaded = None

    def _refresh(self) -> QueueSnapshot:
        asked_at = self._clock()
        try:
            snapshot = self.queue.snapshot()
        except Exception as exc:
            self._last_error = exc
            self._attempts += 1
            self._on_call(exc)
            raise
        self._on_call(None)
        # The end of the call, not its start: callers waiting on a slow call must not repeat it.
        taken_at = self._clock()
        self._on_snapshot(snapshot, asked_at, taken_at)
        self._loaded = self._store(snapshot, taken_at)
        self._last_error = None
        self._attempts += 1
        return snapshot

    def _fresh_cached(self) -> QueueSnapshot | None:
        loaded = self._read_cache_file()
        if loaded is None:
            return None
        age = self._clock() - loaded.taken_at
        # A negative age means the clock went back: the time stored cannot be trusted.
        return loaded.snapshot if 0 <= age < self.max_age else None

    def _read_cache_file(self) -> _Loaded | None:
        try:
            with open(self._cache_file, "rb") as file:
                status = os.fstat(file.fileno())
                file_key = (status.st_ino, status.st_mtime_ns, status.st_size)
                loaded = self._loaded
                if loaded is not None and loaded.file_key == file_key:
                    return loaded
                data = file.read()
        except FileNotFoundError:
            return None
        try:
            taken_at, snapshot = decode_snapshot(data, self.queue.host)
        except (ValueError, KeyError, TypeError):
            # Damaged, or written by another version of this program: as good as absent.
            return None
        self._loaded = _Loaded(file_key, taken_at, snapshot)
        return self._loaded

    def _store(self, snapshot: QueueSnapshot, taken_at: float) -> _Loaded:
        data = encode_snapshot(snapshot, self.queue.host, taken_at)
        fd, temporary = tempfile.mkstemp(dir=self._cache_file.parent, prefix=f".{self.queue.host}.")
        try:
            with open(fd, "wb") as file:
                file.write(data)
                file.flush()
                status = os.fstat(file.fileno())
            os.replace(temporary, self._cache_file)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
        return _Loaded((status.st_ino, status.st_mtime_ns, status.st_size), taken_at, snapshot)

    @contextlib.contextmanager
    def _host_lock(self) -> Iterator[None]:
        # A new open file each time: flock held through one shared descriptor would not
        # exclude the threads of this process from each other.
        with open(self._lock_file, "a") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


def encode_snapshot(snapshot: QueueSnapshot, host: str, taken_at: float) -> bytes:
    """The cache file's content: JSON with times in ISO 8601 and enums by value."""
    document = {
        "format": CACHE_FORMAT,
        "host": host,
        "taken_at": datetime.fromtimestamp(taken_at, UTC).isoformat(),
        "tasks": [_plain(task) for task in snapshot.tasks.values()],
        "groups": [_plain(group) for group in snapshot.groups.values()],
    }
    return json.dumps(document).encode()


def decode_snapshot(data: bytes, host: str) -> tuple[float, QueueSnapshot]:
    """(taken_at, snapshot) from a cache file; ValueError if it is not one for this host."""
    document = json.loads(data)
    if document.get("format") != CACHE_FORMAT or document.get("host") != host:
        raise ValueError("not a status cache of this format and host")
    tasks = [_rebuild(TaskInfo, raw) for raw in document["tasks"]]
    groups = [_rebuild(GroupInfo, raw) for raw in document["groups"]]
    snapshot = QueueSnapshot(
        tasks={task.id: task for task in tasks},
        groups={group.name: group for group in groups},
    )
    return datetime.fromisoformat(document["taken_at"]).timestamp(), snapshot


def _plain(record: Any) -> dict[str, Any]:
    return {field.name: _plain_value(getattr(record, field.name)) for field in dataclasses.fields(record)}


def _plain_value(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, enum.Enum):
        return value.value
    return value


def _rebuild(cls: type, raw: dict[str, Any]) -> Any:
    # Driven by the field types, so that a field added to TaskInfo needs no change here.
    hints = typing.get_type_hints(cls)
    return cls(**{name: _typed_value(hints[name], value) for name, value in raw.items()})


def _typed_value(hint: Any, value: Any) -> Any:
    if value is None:
        return None
    for candidate in _non_none_types(hint):
        if candidate is datetime:
            return datetime.fromisoformat(value)
        if isinstance(candidate, type) and issubclass(candidate, enum.Enum):
            return candidate(value)
    return value


def _non_none_types(hint: Any) -> list[Any]:
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return [arg for arg in typing.get_args(hint) if arg is not type(None)]
    return [hint]


class SharedLogTails:
    """The last lines of every running task that cases of this process wait on, read for all of
    them in one `pueue log ID...` per host at most every `max_age` seconds, not one per case.

    A case `watch`es its task while it waits and `forget`s it after. `tail` answers from the
    last read, refreshing it first when it is older than `max_age`; None when the task was not
    in a successful read yet (a failed read is not repeated before `max_age` either: progress
    can wait, the host may be struggling).
    """

    def __init__(self, queue: Queue, max_age: float, lines: int, *, clock: Callable[[], float] = time.monotonic):
        self.queue = queue
        self.max_age = max_age
        self.lines = lines
        self._clock = clock
        self._watched: dict[int, str] = {}  # task id -> label
        self._tails: dict[int, str] = {}
        self._read_at = -float("inf")
        self._lock = threading.Lock()

    def watch(self, task_id: int, label: str) -> None:
        with self._lock:
            self._watched[task_id] = label

    def forget(self, task_id: int) -> None:
        with self._lock:
            self._watched.pop(task_id, None)
            self._tails.pop(task_id, None)

    def tail(self, task_id: int) -> str | None:
        with self._lock:
            if task_id in self._watched and self._clock() - self._read_at >= self.max_age:
                self._read_at = self._clock()
                try:
                    self._tails = self.queue.log_tails(dict(self._watched), self.lines)
                except (TransportError, MqiError) as exc:
                    log.info("host %s: no progress this time: %s", self.queue.host, exc)
                    self._tails = {}
            return self._tails.get(task_id)
