"""Finding the case folders in the inbox that are complete.

Every direct sub-folder of the inbox is one case. A folder is complete:
- with `ready_marker` set: as soon as a file of that name exists directly in it. The marker
  is the sender's word that it has finished, so nothing else is checked (no quiet time, no
  look inside), and a folder without the marker is never complete however long it rests;
- otherwise: when nothing in it has changed for `quiet_seconds` and no copy is in progress.

Changes are judged from the file system alone, so that a scan in a fresh process (each run
of the scheduled scan flow) needs no memory of earlier scans: the newest modification or
inode-change time (mtime, ctime) of any file or folder in the case, compared with now.
Folder times show additions, deletions and renames; ctime shows renames and chmod, which
keep mtime. A scanner that lives across scans also remembers a fingerprint of each folder
and restarts the quiet time when it sees the fingerprint change: that still holds when the
inbox is on a file server whose clock is behind ours.

Temporary names (`*.tmp`, `*.partial`, names starting with a dot; suffixes in any case):
- a case folder so named is not a case (copy into `name.partial`, then rename to `name`);
- inside a case such files and folders are not content: changes within them do not count
  and temporary folders are not looked into. Creating or deleting one still changes the time of
  the folder that holds it, which counts, so that alone delays completion once;
- except that a `*.partial` file or folder anywhere in a case (outside temporary folders,
  which are not looked into) means a copy is in progress: the case is not complete while
  one exists.

A folder that disappears before it is complete yields nothing. Folders the caller says are
already registered are not looked into. Problems (an unreadable folder, times in the
future) are returned alongside, never raised: one bad folder must not stop the others.
Symbolic links are not followed; a link in the inbox is not a case.
"""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from mqi.settings import InboxSettings

IN_PROGRESS_SUFFIX = ".partial"
TEMPORARY_SUFFIXES = (".tmp", IN_PROGRESS_SUFFIX)
# How far in the future a change time may lie before it is worth telling someone.
FUTURE_TOLERANCE_SECONDS = 60.0
NS = 1_000_000_000


def is_temporary_name(name: str) -> bool:
    return name.startswith(".") or name.lower().endswith(TEMPORARY_SUFFIXES)


def _marks_copy_in_progress(name: str) -> bool:
    return name.lower().endswith(IN_PROGRESS_SUFFIX)


@dataclass(frozen=True)
class ReadyFolder:
    """A complete case folder."""

    path: Path  # absolute: the inbox path made absolute, then the folder's name
    arrived_at: datetime  # aware UTC: when the folder's own entry list last changed (its ctime)

    @property
    def name(self) -> str:
        return self.path.name


@dataclass(frozen=True)
class InboxProblem:
    path: Path
    reason: str

    def __str__(self) -> str:
        # repr: folder names may hold newlines or bytes that are not UTF-8
        return f"{str(self.path)!r}: {self.reason}"


@dataclass(frozen=True)
class ScanResult:
    ready: list[ReadyFolder]  # in arrival order, then by name
    problems: list[InboxProblem] = field(default_factory=list)


@dataclass(frozen=True)
class _Walk:
    """What one look through a case folder found."""

    newest_change_ns: int
    fingerprint: tuple[int, int, int, int]  # entries, bytes, newest mtime, newest ctime


@dataclass
class _Seen:
    fingerprint: tuple[int, int, int, int]
    changed_at: float | None  # our clock when we saw it change; None: never seen changing


class _Unreadable(Exception):
    def __init__(self, path: str, error: OSError):
        self.path = path
        self.error = error.strerror or str(error)

    def reason(self, case_folder: str) -> str:
        if self.path == case_folder:
            return f"cannot read the folder: {self.error}"
        return f"cannot read {os.path.relpath(self.path, case_folder)!r} inside it: {self.error}"


class _Vanished(Exception):
    """Something in the folder went away while we looked: it is changing, or gone."""


def _nothing_known(path: Path) -> bool:
    return False


class InboxScanner:
    """Finds complete case folders; keep one for the life of a process to remember fingerprints."""

    def __init__(self, settings: InboxSettings, clock: Callable[[], float] = time.time):
        self.settings = settings
        self.inbox = settings.path.expanduser().absolute()
        self._clock = clock
        self._seen: dict[str, _Seen] = {}

    def scan(self, known: Callable[[Path], bool] = _nothing_known) -> ScanResult:
        """The complete folders not `known` (e.g. `registered_paths.__contains__`)."""
        problems: list[InboxProblem] = []
        try:
            candidates = self._case_folders()
        except OSError as error:
            return ScanResult([], [InboxProblem(self.inbox, f"cannot read the inbox: {error.strerror or error}")])
        now = self._clock()
        ready, looked_at = [], set()
        for entry in candidates:
            path = self.inbox / entry.name
            if known(path):
                continue
            looked_at.add(entry.name)
            try:
                arrived = self._ready_since(entry, path, now, problems)
            except _Vanished:
                continue
            except _Unreadable as problem:
                problems.append(InboxProblem(path, problem.reason(entry.path)))
                continue
            if arrived is not None:
                ready.append(ReadyFolder(path, datetime.fromtimestamp(arrived / NS, UTC)))
        self._forget_all_but(looked_at)
        ready.sort(key=lambda folder: (folder.arrived_at, os.fsencode(folder.name)))
        return ScanResult(ready, problems)

    def _case_folders(self) -> list[os.DirEntry]:
        with os.scandir(self.inbox) as entries:
            return [
                entry
                for entry in entries
                if not is_temporary_name(entry.name) and entry.is_dir(follow_symlinks=False)
            ]

    def _ready_since(
        self, entry: os.DirEntry, path: Path, now: float, problems: list[InboxProblem]
    ) -> int | None:
        """The folder's ctime (ns) if it is complete, else None."""
        folder = _lstat(entry.path)
        if self.settings.ready_marker is not None:
            return folder.st_ctime_ns if _exists(os.path.join(entry.path, self.settings.ready_marker)) else None
        walk = _walk(entry.path, folder)
        if walk is None:
            return None
        if walk.newest_change_ns > (now + FUTURE_TOLERANCE_SECONDS) * NS:
            ahead = walk.newest_change_ns / NS - now
            problems.append(InboxProblem(
                path, f"changed {ahead:.0f} s in the future: is this machine's clock behind the file server's?"
            ))
        quiet = now - walk.newest_change_ns / NS >= self.settings.quiet_seconds
        unchanged = self._unchanged_long_enough(entry.name, walk.fingerprint, now)
        return folder.st_ctime_ns if quiet and unchanged else None

    def _unchanged_long_enough(self, name: str, fingerprint: tuple[int, int, int, int], now: float) -> bool:
        seen = self._seen.get(name)
        if seen is None:
            self._seen[name] = _Seen(fingerprint, changed_at=None)
            return True
        if seen.fingerprint != fingerprint:
            seen.fingerprint, seen.changed_at = fingerprint, now
        return seen.changed_at is None or now - seen.changed_at >= self.settings.quiet_seconds

    def _forget_all_but(self, names: set[str]) -> None:
        for name in self._seen.keys() - names:
            del self._seen[name]


def _walk(root: str, root_status: os.stat_result) -> _Walk | None:
    """What the case folder holds; None when a copy into it is in progress."""
    entries, total_bytes = 0, 0
    newest_mtime, newest_ctime = root_status.st_mtime_ns, root_status.st_ctime_ns
    pending = [root]
    while pending:
        folder = pending.pop()
        for entry in _list(folder):
            if _marks_copy_in_progress(entry.name):
                return None
            if is_temporary_name(entry.name):
                continue
            status = _lstat(entry.path, entry)
            entries += 1
            total_bytes += status.st_size
            newest_mtime = max(newest_mtime, status.st_mtime_ns)
            newest_ctime = max(newest_ctime, status.st_ctime_ns)
            if stat.S_ISDIR(status.st_mode):
                pending.append(entry.path)
    fingerprint = (entries, total_bytes, newest_mtime, newest_ctime)
    return _Walk(max(newest_mtime, newest_ctime), fingerprint)


def _list(folder: str) -> list[os.DirEntry]:
    try:
        with os.scandir(folder) as entries:
            return list(entries)
    except FileNotFoundError:
        raise _Vanished from None
    except OSError as error:
        raise _Unreadable(folder, error) from None


def _lstat(path: str, entry: os.DirEntry | None = None) -> os.stat_result:
    try:
        return entry.stat(follow_symlinks=False) if entry is not None else os.lstat(path)
    except FileNotFoundError:
        raise _Vanished from None
    except OSError as error:
        raise _Unreadable(path, error) from None


def _exists(path: str) -> bool:
    try:
        os.lstat(path)
    except FileNotFoundError:
        return False
    except OSError as error:
        raise _Unreadable(path, error) from None
    return True
