"""Small pieces both transports share."""

from __future__ import annotations

import time
from collections.abc import Sequence

from mqi.transport.base import CommandTimeout


class Deadline:
    """A point in time a command must finish by; `remaining()` is never negative."""

    def __init__(self, timeout: float):
        self.timeout = timeout
        self._end = time.monotonic() + timeout

    def remaining(self) -> float:
        return max(0.0, self._end - time.monotonic())

    @property
    def passed(self) -> bool:
        return time.monotonic() >= self._end


def command_timeout(host: str, argv: Sequence[str], timeout: float) -> CommandTimeout:
    return CommandTimeout(host, f"{argv[0]!r} did not finish within {timeout:g} s")
