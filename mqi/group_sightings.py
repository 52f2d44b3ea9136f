"""What we last saw of each pueue group of a host, kept beside the host's health file.

pueue does not record why a group is paused; whether a daemon restart or a person paused it
is told from what we saw before (`mqi.queue.restart.pause_cause`): the last time the group
was seen running, and the first time it was seen paused after that. Every status call that
reaches a host records them (`record_seen`), at most once per host per poll interval, in
`state_dir/hosts/<host>.groups.json`. The same file keeps what reconcile decided about a
pause, for `mqi hosts`, and whether that pause was announced, so that it is announced once.

Several processes record at once: a record is read, changed and written atomically under an
exclusive `flock` on `<host>.groups.lock`; readers need no lock. Times are aware UTC, on our
own clock.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, replace
from datetime import datetime
from pathlib import Path

from mqi.host_health import health_file
from mqi.queue.base import GroupInfo
from mqi.queue.local import write_json_atomic
from mqi.queue.restart import GroupSeen

log = logging.getLogger(__name__)

SIGHTINGS_FORMAT = 1
_TIMES = ("running_at", "paused_since", "announced_for")


@dataclass(frozen=True)
class GroupRecord:
    running_at: datetime | None = None  # the last time the group was seen running (a call's start)
    paused_since: datetime | None = None  # the first time it was seen paused after that (a call's end)
    pause_cause: str | None = None  # why it is paused, as reconcile decided
    announced_for: datetime | None = None  # the pause (its paused_since) already announced

    @property
    def seen(self) -> GroupSeen:
        return GroupSeen(self.running_at, self.paused_since)


def sightings_file(state_dir: Path, host: str) -> Path:
    return health_file(state_dir, host).with_name(f"{host}.groups.json")


def group_records(state_dir: Path, host: str) -> dict[str, GroupRecord]:
    """What was recorded of each group of `host` ({} when nothing was)."""
    path = sightings_file(state_dir, host)
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
        if document["format"] != SIGHTINGS_FORMAT or document["host"] != host:
            raise ValueError("another format or host")
        return {name: _record(fields) for name, fields in document["groups"].items()}
    except FileNotFoundError:
        return {}
    except (ValueError, KeyError, TypeError) as error:
        # Damaged or foreign: as good as absent (a pause is then left to a person).
        log.warning("ignoring unreadable group sightings file %s: %s", path, error)
        return {}


def record_seen(state_dir: Path, host: str, groups: Mapping[str, GroupInfo], asked_at: datetime,
                answered_at: datetime) -> None:
    """The groups as one status call, asked at `asked_at` and answered at `answered_at`, saw
    them. The host read them at some moment between: a group seen running is recorded as running
    at the call's start, one seen paused as paused at its end, so that neither is ever placed
    later (running) or earlier (paused) than it was."""
    with _locked(state_dir, host) as records:
        for name, group in groups.items():
            previous = records.get(name, GroupRecord())
            if not group.paused:
                records[name] = GroupRecord(running_at=asked_at)  # a pause, if there was one, is over
            elif previous.paused_since is None:
                records[name] = replace(previous, paused_since=answered_at)


def note_pause_cause(state_dir: Path, host: str, group: str, cause: str, at: datetime) -> bool:
    """Keep why the group, seen paused at `at`, is paused; True the first time for this pause
    (announce it then), False while the same pause lasts."""
    with _locked(state_dir, host) as records:
        record = records.get(group, GroupRecord())
        if record.paused_since is None:
            record = replace(record, paused_since=at)
        records[group] = replace(record, pause_cause=cause, announced_for=record.paused_since)
        return record.announced_for != record.paused_since


@contextlib.contextmanager
def _locked(state_dir: Path, host: str) -> Iterator[dict[str, GroupRecord]]:
    path = sightings_file(state_dir, host)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A new open file each time: flock excludes other open files, so threads too.
    with open(path.with_suffix(".lock"), "a") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        records = group_records(state_dir, host)
        yield records
        groups = {name: _fields(record) for name, record in records.items()}
        write_json_atomic(path, {"format": SIGHTINGS_FORMAT, "host": host, "groups": groups})


def _record(fields: dict) -> GroupRecord:
    for name in _TIMES:
        fields[name] = fields[name] and datetime.fromisoformat(fields[name])
    return GroupRecord(**fields)


def _fields(record: GroupRecord) -> dict:
    fields = asdict(record)
    for name in _TIMES:
        fields[name] = fields[name] and fields[name].isoformat()
    return fields
