"""`mqi status` and `mqi show` answered by the running main job, over a local socket.

A new `mqi` process spends about 0.7 s importing pydantic-settings and SQLAlchemy before its
first query; `mqi run` has them loaded and the ledger open, and answers in milliseconds. So
the `mqi` command first asks the main job that has the same settings (the same settings file
and content, `MQI_` variables and working folder: `mqi.settings_inputs.SettingsInputs`), which
`deploy/bin/mqi-site` gives by running commands as the service runs. With no such job, or no
answer in time, the command reads the ledger itself, as before: never a different answer, only
a slower one.

The socket lives in a folder of the user's own (`$TMPDIR` or /tmp, `mqi-<uid>`, mode 0700,
as tmux does). Its name comes from the inputs without secrets (every local user can list
socket names); the request carries the full digest, which the job compares with its own.
This module imports only the standard library; the job's side is `mqi.job_answers`.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import sys
from pathlib import Path

from mqi.settings_inputs import SettingsInputs

QUICK_COMMANDS = frozenset({"status", "show"})
# A busy job (a burst of cases) may take a moment; after this the command reads the ledger itself.
REPLY_TIMEOUT_SECONDS = 5.0
_CONFIG_OPTIONS = ("--config", "-c")


def socket_dir() -> Path:
    return Path(os.environ.get("TMPDIR") or "/tmp") / f"mqi-{os.getuid()}"


def private_socket_dir(create: bool) -> Path | None:
    """The folder, if it is this user's alone (created so when asked); None otherwise."""
    folder = socket_dir()
    if create:
        folder.mkdir(mode=0o700, exist_ok=True)
    try:
        info = folder.lstat()
    except OSError:
        return None
    private = stat.S_ISDIR(info.st_mode) and info.st_uid == os.getuid() and not info.st_mode & 0o077
    return folder if private else None


def socket_path(folder: Path, inputs: SettingsInputs) -> Path:
    # Short names: a socket path must fit in 108 bytes.
    return folder / f"{inputs.public_digest()[:24]}.sock"


def split_command(argv: list[str]) -> tuple[Path | None, list[str]] | None:
    """(--config value, the command and its arguments) for a quick command, else None."""
    config = None
    rest = list(argv)
    while rest and rest[0].startswith("-"):
        option = rest.pop(0)
        if option.startswith("--config="):
            config = Path(option.split("=", 1)[1])
        elif option in _CONFIG_OPTIONS and rest:
            config = Path(rest.pop(0))
        else:
            return None  # --help or an option the full command line explains
    if not rest or rest[0] not in QUICK_COMMANDS or "--help" in rest:
        return None
    return config, rest


def ask_running_job(argv: list[str]) -> int | None:
    """Print the running job's answer to `mqi ARGV` and return its exit code; None when the
    command must run here (not a quick command, no job with these settings, no answer)."""
    try:
        return _ask(argv)
    except Exception:  # only a shortcut: whatever goes wrong here, the full command answers
        return None


def _ask(argv: list[str]) -> int | None:
    command = split_command(argv)
    folder = private_socket_dir(create=False)
    if command is None or folder is None:
        return None
    config, args = command
    inputs = SettingsInputs.of_this_process(config)
    reply = _exchange(socket_path(folder, inputs),
                      {"digest": inputs.digest(), "args": args, "color": sys.stdout.isatty()})
    if not _is_answer(reply):
        return None
    # Encoded before anything is written: a terminal that cannot show a name (an ASCII
    # locale) leaves the output to the full command, which click writes as UTF-8.
    out = reply["stdout"].encode(sys.stdout.encoding or "utf-8")
    err = reply["stderr"].encode(sys.stderr.encoding or "utf-8")
    sys.stdout.buffer.write(out)
    sys.stdout.flush()
    sys.stderr.buffer.write(err)
    return reply["exit_code"]


def _is_answer(reply: object) -> bool:
    return (isinstance(reply, dict) and isinstance(reply.get("stdout"), str)
            and isinstance(reply.get("stderr"), str) and type(reply.get("exit_code")) is int)


def _exchange(path: Path, request: dict) -> dict | None:
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as connection:
            connection.settimeout(REPLY_TIMEOUT_SECONDS)
            connection.connect(str(path))
            connection.sendall(json.dumps(request).encode() + b"\n")
            connection.shutdown(socket.SHUT_WR)
            return json.loads(_read_all(connection))
    except (OSError, ValueError):  # no job, a job gone, a timeout, a broken reply
        return None


def _read_all(connection: socket.socket) -> bytes:
    chunks = []
    while chunk := connection.recv(1 << 16):
        chunks.append(chunk)
    return b"".join(chunks)
