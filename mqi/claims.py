"""Which cases a live process is working on, told by the operating system.

A process working on a case holds an exclusive `flock` on `state_dir/claims/<case id>.lock`.
The kernel drops the lock the moment the process dies, however it dies, so a claim can never
outlive its holder: `reconcile` tries the lock to find cases whose flow run is gone, and a
second run of the same case cannot start while the first one lives.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class CaseBusy(Exception):
    """Another live process is working on this case."""


def _lock_path(state_dir: Path, case_id: int) -> Path:
    folder = state_dir / "claims"
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    return folder / f"{case_id}.lock"


@contextmanager
def claim(state_dir: Path, case_id: int) -> Iterator[None]:
    """Hold the case for the life of the block; raise CaseBusy if another process does."""
    fd = os.open(_lock_path(state_dir, case_id), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise CaseBusy(f"case {case_id} is being processed by another live process") from None
        yield
    finally:
        os.close(fd)


def is_claimed(state_dir: Path, case_id: int) -> bool:
    try:
        with claim(state_dir, case_id):
            return False
    except CaseBusy:
        return True


def claimed_case_ids(state_dir: Path) -> set[int]:
    folder = state_dir / "claims"
    if not folder.is_dir():
        return set()
    ids = {int(p.stem) for p in folder.glob("*.lock") if p.stem.isdigit()}
    return {case_id for case_id in ids if is_claimed(state_dir, case_id)}


# A process holding a GPU slot records the slot's lease here, so that the slot of a process
# that died can be given back at once (reconcile, or the case's next run) instead of waiting
# for the lease to expire.


def _lease_path(state_dir: Path, case_id: int) -> Path:
    return _lock_path(state_dir, case_id).with_suffix(".lease")


def record_lease(state_dir: Path, case_id: int, lease_id: str) -> None:
    path = _lease_path(state_dir, case_id)
    temporary = path.with_suffix(".lease.tmp")
    temporary.write_text(lease_id)
    temporary.replace(path)


def forget_lease(state_dir: Path, case_id: int) -> None:
    _lease_path(state_dir, case_id).unlink(missing_ok=True)


def recorded_lease(state_dir: Path, case_id: int) -> str | None:
    try:
        return _lease_path(state_dir, case_id).read_text().strip() or None
    except FileNotFoundError:
        return None


def orphaned_leases(state_dir: Path) -> dict[int, str]:
    """Slot leases recorded by processes that are gone: {case id: lease id}."""
    folder = state_dir / "claims"
    if not folder.is_dir():
        return {}
    leases = {}
    for path in folder.glob("*.lease"):
        if path.stem.isdigit() and not is_claimed(state_dir, int(path.stem)):
            lease = recorded_lease(state_dir, int(path.stem))
            if lease:
                leases[int(path.stem)] = lease
    return leases
