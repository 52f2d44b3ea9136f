"""Stopping `mqi run`: its case threads leave their waits at once instead of holding it up.

A case waits for hours (its task on the GPU); when the main job stops, the waits of its case
threads raise `MainJobStopping` so each thread ends promptly. The case is not failed: its
claim dies with the process and reconcile resumes it when the main job starts again. A thread
not started by the main job (the CLI, tests, a worker's flow run) just sleeps.
"""

from __future__ import annotations

import threading
import time

_thread = threading.local()


class MainJobStopping(SystemExit):
    """Not an error of the case: a SystemExit, so no step takes it for a failure, and Prefect
    records the run as crashed by an exit, with no traceback to alarm anyone."""

    def __init__(self) -> None:
        super().__init__("mqi run is stopping; the case resumes when it starts again")


def stop_this_thread_with(event: threading.Event) -> None:
    """The waits of the calling thread end when `event` is set."""
    _thread.event = event


def pause(seconds: float) -> None:
    """Sleep, unless this thread's main job stops first."""
    event = getattr(_thread, "event", None)
    if event is None:
        time.sleep(max(0.0, seconds))
    elif event.wait(max(0.0, seconds)):
        raise MainJobStopping


def check() -> None:
    """Raise MainJobStopping if this thread's main job is stopping."""
    event = getattr(_thread, "event", None)
    if event is not None and event.is_set():
        raise MainJobStopping
