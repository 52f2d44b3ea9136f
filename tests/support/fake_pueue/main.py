"""Entry point of the wrapper scripts: `main.py pueue STATE_DIR ARGS...` or `main.py pueued STATE_DIR ARGS...`.

Run as a script (the wrappers use `python -E -S`, so start-up stays in the tens of
milliseconds); it puts the folder holding the `fake_pueue` package on sys.path itself.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def pueued(state_dir: str, args: list[str]) -> int:
    from fake_pueue.daemon import run_daemon

    if args in ([], ["-d"], ["--daemonize"]):
        return start_in_background(state_dir) if args else run_daemon(state_dir)
    sys.stderr.write(f"error: unexpected arguments {args!r}\n\nUsage: pueued [-d]\n")
    return 2


def start_in_background(state_dir: str) -> int:
    """`pueued -d`: detach a daemon, and return once it answers (or has failed)."""
    import subprocess
    import time

    from fake_pueue.daemon import already_running_message
    from fake_pueue.store import StateDir

    store = StateDir(state_dir)
    if store.daemon_running():
        sys.stderr.write(already_running_message())
        return 1
    with open(store.root / "daemon.log", "ab") as output:
        process = subprocess.Popen(
            [sys.executable, "-E", "-S", os.path.abspath(__file__), "pueued", state_dir],
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


def main() -> int:
    program, state_dir, *args = sys.argv[1:]
    if program == "pueued":
        return pueued(state_dir, args)
    from fake_pueue.commands import main as client_main

    return client_main(state_dir, args)


if __name__ == "__main__":
    sys.exit(main())
