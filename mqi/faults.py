"""Fault points for fault-injection tests: the process dies, or a case's thread stops, here.

`fault_point(name, case)` does nothing unless the environment asks for it; production never
sets these variables.
- MQI_FAULT_POINT=name: the process kills itself with SIGKILL, which no handler, `finally`
  or atexit hook can soften (a power cut at that step).
- MQI_FAULT_HOLD=name@case,name@case,... with MQI_FAULT_HOLD_DIR=folder: the thread of that
  case stops at that point and writes `folder/case@name.held`; it goes on when the test
  deletes the file. Tests hold several cases at different steps of one `mqi run`, then kill
  the whole runtime at once, or cancel them there.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

FAULT_POINT_VARIABLE = "MQI_FAULT_POINT"
FAULT_HOLD_VARIABLE = "MQI_FAULT_HOLD"
FAULT_HOLD_DIR_VARIABLE = "MQI_FAULT_HOLD_DIR"
HOLD_CHECK_SECONDS = 0.05


def fault_point(name: str, case: str | None = None) -> None:
    if os.environ.get(FAULT_POINT_VARIABLE) == name:
        os.kill(os.getpid(), signal.SIGKILL)
    holds = os.environ.get(FAULT_HOLD_VARIABLE)
    if holds and case is not None and f"{name}@{case}" in holds.split(","):
        _hold(Path(os.environ[FAULT_HOLD_DIR_VARIABLE]) / f"{case}@{name}.held")


def _hold(marker: Path) -> None:
    marker.touch()
    while marker.exists():
        time.sleep(HOLD_CHECK_SECONDS)
