"""What the wrapper scripts call: `main("pueue" | "pueued", state_dir, args)`.

The wrappers are Python scripts run with `python -ES` (no site imports, PYTHON* variables
ignored) so that a call starts in a few tens of milliseconds; no shell sits in between, so the
caller's environment reaches `pueue add` unchanged.
"""

import os
import sys


def main(program: str, state_dir: str, args: list[str]) -> int:
    if program == "pueued":
        return pueued(state_dir, args)
    from .commands import main as client_main

    return client_main(state_dir, args)


def pueued(state_dir: str, args: list[str]) -> int:
    from .daemon import run_daemon

    if args in ([], ["-d"], ["--daemonize"]):
        return start_in_background(state_dir) if args else run_daemon(state_dir)
    sys.stderr.write(f"error: unexpected arguments {args!r}\n\nUsage: pueued [-d]\n")
    return 2


def start_in_background(state_dir: str) -> int:
    """`pueued -d`: detach a daemon (this same wrapper without -d); return once it answers."""
    import subprocess
    import time

    from .daemon import already_running_message
    from .store import StateDir

    store = StateDir(state_dir)
    if store.daemon_running():
        sys.stderr.write(already_running_message())
        return 1
    with open(store.root / "daemon.log", "ab") as output:
        process = subprocess.Popen(
            [os.path.abspath(sys.argv[0])],
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if store.daemon_pid() == process.pid:
            return 0
        if process.poll() is not None:
            return 1
        time.sleep(0.02)
    return 1
