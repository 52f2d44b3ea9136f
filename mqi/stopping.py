"""Stopping `mqi run`: its case threads leave their waits at once instead of holding it up.

A case waits for hours (its task on the GPU); when the main job stops, the waits raise
`MainJobStopping` so each thread ends promptly. The case is not failed: its claim dies with
the process and reconcile resumes it when the main job starts again.
"""

from __future__ import annotations

import threading

_stopping = threading.Event()


class MainJobStopping(SystemExit):
    """Not an error of the case: a SystemExit, so no step takes it for a failure, and Prefect
    records the run as crashed by an exit, with no traceback to alarm anyone."""

    def __init__(self) -> None:
        super().__init__("mqi run is stopping; the case resumes when it starts again")


def pause(seconds: float) -> None:
    """Sleep, unless the main job stops first."""
    if _stopping.wait(max(0.0, seconds)):
        raise MainJobStopping


def request_stop() -> None:
    _stopping.set()


def reset() -> None:
    """A main job starting in this process (tests run several) begins unstopped."""
    _stopping.clear()


def check() -> None:
    """Raise MainJobStopping if the main job is stopping."""
    if _stopping.is_set():
        raise MainJobStopping
