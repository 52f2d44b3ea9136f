"""Run a command that ends with the process that started it (Linux).

    python -m mqi.die_with_parent PARENT_PID COMMAND [ARG...]

sets this process's parent-death signal (prctl PR_SET_PDEATHSIG) to SIGKILL, then replaces
itself with COMMAND: the setting survives the exec, so the kernel kills COMMAND when its parent
dies, even by SIGKILL. A launcher rather than Popen's preexec_fn, which is unsafe in a process
with threads.

Two things to know:
- The kernel sends the signal when the *thread* that started this process ends, not the whole
  process: start it from a thread that lives as long as COMMAND should (the main thread).
- A parent that died before the setting took effect is never signalled for: so PARENT_PID is
  compared with the actual parent once the setting is in place, and a mismatch ends this
  process at once (exit code 3) instead of running COMMAND as an orphan.

Elsewhere than Linux, COMMAND just runs (there is no parent-death signal).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
PARENT_GONE = 3
USAGE = "usage: python -m mqi.die_with_parent PARENT_PID COMMAND [ARG...]"


def die_with_parent(parent_pid: int, signum: int = signal.SIGKILL) -> None:
    """Have the kernel send `signum` to this process when its parent dies; exit if it already has."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
        if libc.prctl(PR_SET_PDEATHSIG, signum, 0, 0, 0) != 0:
            error = ctypes.get_errno()
            raise OSError(error, f"prctl(PR_SET_PDEATHSIG): {os.strerror(error)}")
    if os.getppid() != parent_pid:
        print(f"mqi.die_with_parent: parent {parent_pid} has already ended; not starting", file=sys.stderr)
        sys.exit(PARENT_GONE)


def main(argv: list[str]) -> None:
    if len(argv) < 2 or not argv[0].isdigit():
        sys.exit(USAGE)
    die_with_parent(int(argv[0]))
    os.execvp(argv[1], argv[1:])


if __name__ == "__main__":
    main(sys.argv[1:])
