"""One small interface for running commands and moving bytes on a host.

The local and SSH implementations cannot be told apart by their callers: the pueue client,
the local queue and the case transfer only use what is declared here. Command lines are
always argument lists; an implementation that needs a single string (SSH) builds it with
`shlex.join`, so nothing in an argument is ever interpreted by a shell.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import BinaryIO, TypeVar

from mqi.errors import MqiError

T = TypeVar("T")


class TransportError(MqiError):
    """Something went wrong talking to a host. `transient` says whether a retry may help."""

    transient = False

    def __init__(self, host: str, message: str):
        self.host = host
        super().__init__(f"host {host!r}: {message}")


class HostUnreachable(TransportError):
    """Connection refused, reset, DNS failure, no route: retry later with backoff."""

    transient = True


class HostRefused(TransportError):
    """The host cannot be used until an operator acts: its host key is unknown or changed, or
    it refuses our credentials. Not a passing fault (a retry cannot help), and not a fault of
    the case: cases wait for the fix. The message says what to fix."""


class AuthenticationFailed(HostRefused):
    """The host refused our credentials: an operator must fix the key or password."""


class HostKeyRejected(HostRefused):
    """The host key is unknown or has changed; the message carries its fingerprint."""


class CommandTimeout(TransportError):
    """A command did not finish within its timeout (the connection may be fine)."""

    transient = True


class RemoteCommandFailed(TransportError):
    """A command ran and exited non-zero."""

    def __init__(self, host: str, argv: Sequence[str], exit_code: int, stderr: str):
        self.argv = tuple(argv)
        self.exit_code = exit_code
        self.stderr = stderr
        detail = stderr.strip().splitlines()[-1] if stderr.strip() else "no error output"
        super().__init__(host, f"command {argv[0]!r} exited with {exit_code}: {detail}")


@dataclass(frozen=True)
class CommandResult:
    host: str
    argv: tuple[str, ...]
    exit_code: int
    stdout: bytes
    stderr: bytes

    @property
    def out(self) -> str:
        return self.stdout.decode("utf-8", errors="replace")

    @property
    def err(self) -> str:
        return self.stderr.decode("utf-8", errors="replace")

    def check(self) -> CommandResult:
        """Return self, or raise RemoteCommandFailed when the command exited non-zero."""
        if self.exit_code != 0:
            raise RemoteCommandFailed(self.host, self.argv, self.exit_code, self.err)
        return self


class Transport(ABC):
    """Runs commands on one host. Implementations are safe to share across threads."""

    #: the configured host name, used in every message
    host: str

    @abstractmethod
    def run(
        self,
        argv: Sequence[str],
        *,
        timeout: float,
        stdin: bytes | None = None,
        cwd: str | None = None,
    ) -> CommandResult:
        """Run `argv` (no shell), wait at most `timeout` seconds, return what it printed."""

    @abstractmethod
    def run_writing(
        self, argv: Sequence[str], write: Callable[[BinaryIO], None], *, timeout: float
    ) -> CommandResult:
        """Run `argv` and let `write` stream its standard input (for uploads)."""

    @abstractmethod
    def run_reading(
        self, argv: Sequence[str], read: Callable[[BinaryIO], T], *, timeout: float
    ) -> tuple[T, CommandResult]:
        """Run `argv` and let `read` consume its standard output as a stream (for downloads).

        The returned CommandResult has empty stdout (it went to `read`)."""

    def close(self) -> None:
        """Release connections; the transport may be used again afterwards (it reconnects)."""
