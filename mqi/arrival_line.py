"""Cases of one process upload, take GPU slots and reach pueue in the order they arrived.

`ArrivalGate` lets one case at a time through (uploads to one host), the earliest first,
including earlier cases that were started and are still on their way (`ExpectedArrivals`).

Cases whose upload is done stand in a line sorted by arrival. The one whose turn it is tries
its groups once. With a slot, it keeps the turn until its task is submitted, so each group's
queue receives tasks in arrival order; without one, it passes the turn on, so a case pinned to
a full group does not hold up the cases behind it. When every case in the line has tried, the
next round starts after `retry_seconds`, or at once when a slot is given back.
"""

from __future__ import annotations

import threading
import time
from bisect import insort
from collections.abc import Hashable, Iterator
from contextlib import contextmanager

from mqi import stopping

# How long a wait for the turn lasts before it looks whether the main job is stopping.
STOP_CHECK_SECONDS = 0.5
# How long a gate holds its turn for an earlier case that was started but has not reached a
# gate yet. Case runs started together reach their gates up to a few hundred ms apart (the
# flow engine's start varies); a case held up elsewhere (a host down) is not waited for longer.
EXPECTED_GRACE_SECONDS = 2.0
# How often a gate looks again while it waits for such a case (it may go to another host's gate).
EXPECTED_CHECK_SECONDS = 0.05


class ArrivalLine:
    def __init__(self, retry_seconds: float, clock=time.monotonic):
        self.retry_seconds = retry_seconds
        self._clock = clock
        self._changed = threading.Condition()
        self._line: list = []  # keys in arrival order
        self._tried: set = set()  # keys that found no free slot in this round
        self._holder: Hashable | None = None
        self._round_over_at: float | None = None

    @contextmanager
    def standing(self, key: Hashable) -> Iterator[None]:
        """Stand in the line (key: arrival order, e.g. (created_at, case id)) until done."""
        with self._changed:
            insort(self._line, key)
            self._changed.notify_all()
        try:
            yield
        finally:
            with self._changed:
                self._leave(key)
                if self._holder == key:
                    self._holder = None
                self._changed.notify_all()

    def step_out(self, key: Hashable) -> None:
        """Leave the line with a slot, keeping the turn until `pass_turn` (task submitted)."""
        with self._changed:
            self._leave(key)

    def _leave(self, key: Hashable) -> None:
        if key in self._line:
            self._line.remove(key)
        self._tried.discard(key)

    def wait_turn(self, key: Hashable) -> None:
        """Block until it is this case's turn; it holds the turn until `pass_turn`."""
        with self._changed:
            while not self._is_turn_of(key):
                stopping.check()
                self._changed.wait(min(STOP_CHECK_SECONDS, self._time_to_next_round()))
            self._holder = key

    def pass_turn(self, key: Hashable, *, found_no_slot: bool) -> None:
        with self._changed:
            if found_no_slot:
                self._tried.add(key)
            if self._holder == key:
                self._holder = None
            self._changed.notify_all()

    def slot_given_back(self) -> None:
        """A new round at once: the slot goes to the oldest case that can use it."""
        with self._changed:
            self._tried.clear()
            self._round_over_at = None
            self._changed.notify_all()

    def _is_turn_of(self, key: Hashable) -> bool:
        if self._holder is not None:
            return False
        waiting = [k for k in self._line if k not in self._tried]
        if not waiting:  # everyone tried: the next round begins after the pause
            if self._round_over_at is None:
                self._round_over_at = self._clock()
            if self._time_to_next_round() > 0:
                return False
            self._tried.clear()
            self._round_over_at = None
            waiting = list(self._line)
        return waiting[0] == key

    def _time_to_next_round(self) -> float:
        if self._round_over_at is None:
            return STOP_CHECK_SECONDS
        return max(0.0, self._round_over_at + self.retry_seconds - self._clock())


class ExpectedArrivals:
    """Cases this process started that have not reached a gate yet, with when they started."""

    def __init__(self, clock=time.monotonic):
        self._clock = clock
        self._lock = threading.Lock()
        self._since: dict = {}

    def expect(self, key: Hashable) -> None:
        with self._lock:
            self._since.setdefault(key, self._clock())

    def arrived(self, key: Hashable) -> None:
        """At a gate, or its run ended before it reached one."""
        with self._lock:
            self._since.pop(key, None)

    def seconds_to_wait_before(self, key: Hashable) -> float:
        """How long earlier cases still on their way may keep `key` waiting (0: none). Each is
        waited for until its own grace ends: one held up for hours does not end the others'."""
        with self._lock:
            started = [since for earlier, since in self._since.items() if earlier < key]
        if not started:
            return 0.0
        return max(0.0, max(started) + EXPECTED_GRACE_SECONDS - self._clock())


class ArrivalGate:
    """One case at a time, the earliest-arrived of those waiting or on their way first.

    Uploads to one host go through it: over one link, uploads side by side share the bandwidth
    and all end late, so the first case's GPU waits for the last case's data; one at a time,
    the first case is ready after its own upload, and cases reach the GPU line in arrival order.
    """

    def __init__(self, expected: ExpectedArrivals | None = None):
        self._changed = threading.Condition()
        self._waiting: list = []  # keys in arrival order
        self._busy = False
        self._expected = expected or ExpectedArrivals()

    @contextmanager
    def turn(self, key: Hashable) -> Iterator[None]:
        self._expected.arrived(key)
        with self._changed:
            insort(self._waiting, key)
            try:
                while (pause := self._pause_before(key)) > 0:
                    stopping.check()
                    self._changed.wait(pause)
            finally:
                self._waiting.remove(key)
                self._changed.notify_all()
            self._busy = True
        try:
            yield
        finally:
            with self._changed:
                self._busy = False
                self._changed.notify_all()

    def _pause_before(self, key: Hashable) -> float:
        """0 when `key` may go through now, else how long to wait before looking again."""
        if self._busy or self._waiting[0] != key:
            return STOP_CHECK_SECONDS  # woken at once when that changes
        return min(EXPECTED_CHECK_SECONDS, self._expected.seconds_to_wait_before(key))
