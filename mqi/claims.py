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
