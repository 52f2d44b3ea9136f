"""Run commands on this machine, behaving like SshTransport towards its callers.

Commands run without a shell, in their own process group, so a timeout kills the command and
everything it started. Failures the remote shell would report as exit codes (command not
found, working folder missing) are reported the same way here, so callers see one behaviour.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
from collections.abc import Callable, Sequence
from typing import BinaryIO, TypeVar

from mqi.transport._common import command_timeout
from mqi.transport.base import CommandResult, Transport, TransportError

T = TypeVar("T")

EXIT_NOT_FOUND = 127  # what sh returns for an unknown command
EXIT_NOT_EXECUTABLE = 126
EXIT_BAD_CWD = 1  # what `cd DIR && exec ...` returns when DIR is missing
WRITER_FAILED_GRACE = 5.0  # seconds a command may take to finish after its input broke off


class LocalTransport(Transport):
    def __init__(self, host: str = "local"):
        self.host = host

    def __repr__(self) -> str:
        return f"LocalTransport(host={self.host!r})"

    def run(
        self,
        argv: Sequence[str],
        *,
        timeout: float,
        stdin: bytes | None = None,
        cwd: str | None = None,
    ) -> CommandResult:
        argv = tuple(argv)
        try:
            process = self._start(argv, stdin=subprocess.PIPE if stdin else None, cwd=cwd)
        except _StartFailed as failed:
            return failed.result
        try:
            stdout, stderr = process.communicate(stdin, timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(process)
            process.communicate()
            raise command_timeout(self.host, argv, timeout)
        return CommandResult(self.host, argv, process.returncode, stdout, stderr)

    def run_writing(
        self, argv: Sequence[str], write: Callable[[BinaryIO], None], *, timeout: float
    ) -> CommandResult:
        argv = tuple(argv)
        try:
            process = self._start(argv, stdin=subprocess.PIPE)
        except _StartFailed as failed:
            return failed.result
        with _Watchdog(process, timeout) as watchdog:
            stdout = _Drain(process.stdout)
            stderr = _Drain(process.stderr)
            try:
                write(process.stdin)
                process.stdin.close()
            except BrokenPipeError:
                pass  # the command stopped reading: its exit code and stderr say why
            except Exception:
                # as over SSH, the command sees its input end and may clean up; it gets a
                # short grace, not the whole timeout, before its group is killed
                _close_quietly(process.stdin)
                _wait_or_kill(process, WRITER_FAILED_GRACE)
                raise
            except BaseException:
                _kill_group(process)
                process.wait()
                raise
            finally:
                _close_quietly(process.stdin)
            process.wait()
        if watchdog.fired:
            raise command_timeout(self.host, argv, timeout)
        return CommandResult(self.host, argv, process.returncode, stdout.join(), stderr.join())

    def run_reading(
        self, argv: Sequence[str], read: Callable[[BinaryIO], T], *, timeout: float
    ) -> tuple[T, CommandResult]:
        argv = tuple(argv)
        try:
            process = self._start(argv, stdin=None)
        except _StartFailed as failed:
            return read(_EmptyStream()), failed.result
        with _Watchdog(process, timeout) as watchdog:
            stderr = _Drain(process.stderr)
            try:
                value = read(process.stdout)
                _discard_rest(process.stdout)  # let the command finish, as over SSH
            except BaseException:
                _kill_group(process)
                process.wait()
                if watchdog.fired:
                    raise command_timeout(self.host, argv, timeout) from None
                raise
            finally:
                process.stdout.close()
            process.wait()
        if watchdog.fired:
            raise command_timeout(self.host, argv, timeout)
        return value, CommandResult(self.host, argv, process.returncode, b"", stderr.join())

    def _start(self, argv: tuple[str, ...], *, stdin, cwd: str | None = None) -> subprocess.Popen:
        if not argv:
            raise TransportError(self.host, "empty command line")
        try:
            return subprocess.Popen(
                argv,
                stdin=stdin if stdin is not None else subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                cwd=cwd,
                start_new_session=True,  # its own process group, killed as a whole
            )
        except FileNotFoundError as error:
            if cwd is not None and error.filename == cwd:
                raise _StartFailed(self.host, argv, EXIT_BAD_CWD, f"cd: {cwd}: no such folder")
            raise _StartFailed(self.host, argv, EXIT_NOT_FOUND, f"{argv[0]}: not found")
        except PermissionError:
            raise _StartFailed(self.host, argv, EXIT_NOT_EXECUTABLE, f"{argv[0]}: not executable")


class _StartFailed(Exception):
    """The command could not start; carries the result a shell would have given."""

    def __init__(self, host: str, argv: tuple[str, ...], exit_code: int, message: str):
        self.result = CommandResult(host, argv, exit_code, b"", message.encode() + b"\n")


class _Watchdog:
    """Kills the process group when the timeout passes; `fired` tells whether it did."""

    def __init__(self, process: subprocess.Popen, timeout: float):
        self.fired = False
        self._process = process
        self._timer = threading.Timer(timeout, self._fire)
        self._timer.daemon = True

    def _fire(self) -> None:
        self.fired = True
        _kill_group(self._process)

    def __enter__(self) -> _Watchdog:
        self._timer.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._timer.cancel()


class _Drain:
    """Reads a pipe to its end in a thread, so the child never blocks on a full pipe."""

    def __init__(self, pipe: BinaryIO):
        self._chunks: list[bytes] = []
        self._thread = threading.Thread(target=self._read, args=(pipe,), daemon=True)
        self._thread.start()

    def _read(self, pipe: BinaryIO) -> None:
        with pipe:
            while chunk := pipe.read1(65536):
                self._chunks.append(chunk)

    def join(self) -> bytes:
        self._thread.join()
        return b"".join(self._chunks)


class _EmptyStream:
    def read(self, size: int = -1) -> bytes:
        return b""


def _kill_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _wait_or_kill(process: subprocess.Popen, grace: float) -> None:
    try:
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        _kill_group(process)
        process.wait()


def _discard_rest(pipe: BinaryIO) -> None:
    while pipe.read1(65536):
        pass


def _close_quietly(pipe: BinaryIO) -> None:
    try:
        pipe.close()
    except BrokenPipeError:
        pass
