"""Crash points for fault-injection tests: the process dies here as if the power went out.

`fault_point(name)` does nothing unless the environment variable MQI_FAULT_POINT names this
point; then the process kills itself with SIGKILL, which no handler, `finally` or atexit
hook can soften. Tests run `mqi submit` as a child with the variable set, then check that
a restart puts everything right. Production never sets it.
"""

from __future__ import annotations

import os
import signal

FAULT_POINT_VARIABLE = "MQI_FAULT_POINT"


def fault_point(name: str) -> None:
    if os.environ.get(FAULT_POINT_VARIABLE) == name:
        os.kill(os.getpid(), signal.SIGKILL)
