"""Stopping `mqi run`: its case threads leave their waits at once instead of holding it up.
Also a case cancelled while its thread waits for its turn (an upload, a GPU slot, a host)
ends that wait within one check interval (`watching`).

A case waits for hours (its task on the GPU); when the main job stops, the waits of its case
threads raise `MainJobStopping` so each thread ends promptly. The case is not failed: its
claim dies with the process and reconcile resumes it when the main job starts again. A thread
not started by the main job (the CLI, tests, a worker's flow run) just sleeps.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

_thread = threading.local()


class MainJobStopping(SystemExit):
    """Not an error of the case: a SystemExit, so no step takes it for a failure, and Prefect
    records the run as crashed by an exit, with no traceback to alarm anyone."""

    def __init__(self) -> None:
        super().__init__("mqi run is stopping; the case resumes when it starts again")


def stop_this_thread_with(event: threading.Event) -> None:
    """The waits of the calling thread end when `event` is set."""
    _thread.event = event


@contextmanager
def watching(check_case: Callable[[], None], every_seconds: float) -> Iterator[None]:
    """While the block runs, the waits of this thread call `check_case` (at most every
    `every_seconds`); it raises to end the wait, e.g. when the case was cancelled."""
    previous = getattr(_thread, "watch", None)
    _thread.watch = [check_case, every_seconds, time.monotonic()]
    try:
        yield
    finally:
        _thread.watch = previous


def pause(seconds: float) -> None:
    """Sleep, unless this thread's main job stops first (or its watched case is cancelled)."""
    event = getattr(_thread, "event", None)
    watch = getattr(_thread, "watch", None)
    end = time.monotonic() + max(0.0, seconds)
    while (left := end - time.monotonic()) > 0:
        step = left if watch is None else min(left, watch[1])
        if event is None:
            time.sleep(step)
        elif event.wait(step):
            raise MainJobStopping
        _check_watch(watch)


def check() -> None:
    """Raise MainJobStopping if this thread's main job is stopping (or what `watching` raises)."""
    event = getattr(_thread, "event", None)
    if event is not None and event.is_set():
        raise MainJobStopping
    _check_watch(getattr(_thread, "watch", None))


def _check_watch(watch: list | None) -> None:
    if watch is None or time.monotonic() - watch[2] < watch[1]:
        return
    watch[2] = time.monotonic()
    watch[0]()
