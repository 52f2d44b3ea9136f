"""What every Transport promises, checked on LocalTransport and on SshTransport to a real sshd."""

from __future__ import annotations

import time

import pytest

from mqi.transport.base import CommandTimeout, RemoteCommandFailed


@pytest.fixture
def transport(each_transport):
    return each_transport


def test_run_returns_output_and_exit_code(transport):
    result = transport.run(["sh", "-c", "echo out; echo err >&2; exit 3"], timeout=20)

    assert (result.exit_code, result.out, result.err) == (3, "out\n", "err\n")
    assert result.host == transport.host
    with pytest.raises(RemoteCommandFailed, match="exited with 3: err"):
        result.check()


def test_arguments_reach_the_command_exactly_and_are_never_run(transport, tmp_path):
    canary = tmp_path / "CANARY"
    tricky = [
        f"$(touch {canary})", f"`touch {canary}`", f"; touch {canary}", "a b", "'\"", "-n", "\n"
    ]

    result = transport.run(["printf", "%s|", *tricky], timeout=20).check()

    assert result.out == "|".join(tricky) + "|"
    assert not canary.exists()


def test_stdin_is_passed(transport):
    data = bytes(range(256)) * 1000

    result = transport.run(["cat"], stdin=data, timeout=20).check()

    assert result.stdout == data


def test_stdin_a_command_does_not_read_is_no_error(transport):
    result = transport.run(["true"], stdin=b"z" * 20_000_000, timeout=30)

    assert result.exit_code == 0


def test_cwd(transport, tmp_path):
    folder = tmp_path / "a folder; with $(odd) name"
    folder.mkdir()

    assert transport.run(["pwd"], cwd=str(folder), timeout=20).check().out == f"{folder}\n"
    assert transport.run(["pwd"], cwd=str(tmp_path / "missing"), timeout=20).exit_code != 0


def test_unknown_command_exits_127(transport):
    assert transport.run(["no-such-command-mqi"], timeout=20).exit_code == 127


def test_timeout_raises_and_the_transport_stays_usable(transport):
    started = time.monotonic()
    with pytest.raises(CommandTimeout, match="'sleep' did not finish within 1 s"):
        transport.run(["sleep", "30"], timeout=1)
    assert time.monotonic() - started < 10

    assert transport.run(["echo", "still fine"], timeout=20).check().out == "still fine\n"


def test_run_writing_streams_stdin(transport):
    def write(stream):
        for _ in range(64):
            stream.write(b"x" * 65536)

    result = transport.run_writing(["wc", "-c"], write, timeout=30).check()

    assert result.out.strip() == str(64 * 65536)


def test_run_writing_reports_a_command_that_stops_reading(transport):
    def write(stream):
        for _ in range(1000):
            stream.write(b"y" * 65536)

    result = transport.run_writing(["sh", "-c", "head -c 10 >/dev/null; exit 5"], write, timeout=30)

    assert result.exit_code == 5


def test_run_reading_streams_stdout(transport):
    size = 20 * 1024 * 1024

    def read(stream):
        total = 0
        while chunk := stream.read(1 << 20):
            total += len(chunk)
        return total

    total, result = transport.run_reading(["head", "-c", str(size), "/dev/zero"], read, timeout=60)

    assert total == size
    assert result.check().stdout == b""


def test_run_reading_lets_the_command_finish_when_not_all_is_read(transport):
    value, result = transport.run_reading(
        ["sh", "-c", "head -c 5000000 /dev/zero; echo done >&2; exit 4"],
        lambda stream: stream.read(10),
        timeout=30,
    )

    assert len(value) <= 10
    assert (result.exit_code, result.err) == (4, "done\n")


def test_run_reading_timeout(transport):
    with pytest.raises(CommandTimeout):
        transport.run_reading(["sleep", "30"], lambda stream: stream.read(), timeout=1)
