"""LocalTransport specifics: a timeout ends the whole process group, not only the command."""

from __future__ import annotations

import os
import time

import pytest

from mqi.transport.base import CommandTimeout
from mqi.transport.local import LocalTransport


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.parametrize("method", ["run", "run_writing", "run_reading"])
def test_timeout_kills_the_commands_children_too(tmp_path, method):
    pid_file = tmp_path / "child.pid"
    argv = ["sh", "-c", f"sleep 60 & echo $! > {pid_file}; wait"]
    transport = LocalTransport()
    calls = {
        "run": lambda: transport.run(argv, timeout=1),
        "run_writing": lambda: transport.run_writing(argv, lambda stream: None, timeout=1),
        "run_reading": lambda: transport.run_reading(argv, lambda stream: stream.read(), timeout=1),
    }

    with pytest.raises(CommandTimeout):
        calls[method]()

    child = int(pid_file.read_text())
    deadline = time.monotonic() + 5
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(child)


def test_an_error_in_the_writer_ends_the_input_and_propagates(tmp_path):
    """As over SSH: the command sees the end of its input (and can clean up)."""

    class Refused(Exception):
        pass

    def write(stream):
        stream.write(b"partial")
        raise Refused("bad input")

    finished = tmp_path / "finished"
    with pytest.raises(Refused):
        LocalTransport().run_writing(
            ["sh", "-c", f"cat >/dev/null; touch {finished}"], write, timeout=30
        )

    assert finished.exists()
