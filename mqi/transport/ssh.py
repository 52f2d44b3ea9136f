"""Run commands on a host over SSH (paramiko), one shared connection per host per process.

Every caller of one `SshTransport` shares a single SSH connection: each command is one
channel on it. Opening a connection costs a key exchange and authentication (and sshd's
MaxStartups drops bursts of new ones), so it is opened once, kept alive, and reopened with
exponential backoff when it breaks. `shared_ssh_transport` hands out the same instance for
the same configuration, so the whole process holds one connection per host.

Host keys are checked against a known_hosts file; an unknown key is recorded only when
`accept_unknown_host_keys` is set. Passwords and passphrases are `SecretStr`s and appear in
no message, log or repr.

A command that times out has its channel closed; sshd sends a command without a terminal
no signal, so it may run on. Work that must be stoppable runs under pueue.
"""

from __future__ import annotations

import base64
import collections
import hashlib
import random
import shlex
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, TypeVar

import paramiko
from paramiko.buffered_pipe import BufferedPipe
from paramiko.hostkeys import HostKeyEntry, InvalidHostKey
from pydantic import SecretStr

from mqi.transport._common import Deadline, command_timeout
from mqi.transport.base import (
    AuthenticationFailed,
    CommandResult,
    HostKeyRejected,
    HostRefused,
    HostUnreachable,
    Transport,
)

T = TypeVar("T")

#: Flow control for what we receive: a large window keeps the sender busy on a fast link,
#: and larger packets than OpenSSH's own 32 KB mean fewer to decrypt one by one in Python
#: (OpenSSH's limit for a whole packet is 256 KB). What we send goes in the server's size.
CHANNEL_WINDOW = 16 * 1024 * 1024
CHANNEL_PACKET = 128 * 1024
READ_CHUNK = 1024 * 1024
POLL_SLICE = 0.2  # seconds between looks at stderr while waiting for stdout
#: AES-GCM needs no separate MAC pass, so it is the cheapest cipher paramiko offers.
PREFERRED_CIPHERS = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com")
#: How paramiko reports a connection cut under a channel: a socket error, or EOFError from its
#: packet writer, or SSHException.
_CONNECTION_ERRORS = (OSError, EOFError, paramiko.SSHException)
#: sshd refuses more than MaxSessions (default 10) channels on one connection.
DEFAULT_MAX_SESSIONS = 8


def fingerprint(key: paramiko.PKey) -> str:
    """The `SHA256:...` form OpenSSH prints (`ssh-keygen -l`)."""
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


class SshTransport(Transport):
    def __init__(
        self,
        host: str,
        *,
        hostname: str,
        port: int = 22,
        username: str,
        key_file: Path | None = None,
        key_passphrase: SecretStr | None = None,
        password: SecretStr | None = None,
        known_hosts: Path | None = None,
        accept_unknown_host_keys: bool = False,
        connect_timeout: float = 10.0,
        keepalive_seconds: int = 30,
        max_sessions: int = DEFAULT_MAX_SESSIONS,
        connect_attempts: int = 4,
        first_backoff_seconds: float = 1.0,
    ):
        self.host = host
        self.hostname = hostname
        self.port = port
        self.username = username
        self.key_file = Path(key_file).expanduser() if key_file else None
        self._key_passphrase = _as_secret(key_passphrase)
        self._password = _as_secret(password)
        self.known_hosts = Path(known_hosts or "~/.ssh/known_hosts").expanduser()
        self.accept_unknown_host_keys = accept_unknown_host_keys
        self.connect_timeout = connect_timeout
        self.keepalive_seconds = keepalive_seconds
        self.connect_attempts = max(1, connect_attempts)
        self.first_backoff_seconds = first_backoff_seconds
        #: how many SSH connections this transport has opened (1 unless one broke)
        self.connections_opened = 0
        self._sessions = threading.BoundedSemaphore(max_sessions)
        self._connect_lock = threading.Lock()
        self._client: paramiko.SSHClient | None = None
        self._failure: tuple[float, str] | None = None  # when the last connect gave up, why

    def __repr__(self) -> str:
        return f"SshTransport(host={self.host!r}, {self.username}@{self.hostname}:{self.port})"

    # -- the Transport interface ------------------------------------------------------

    def run(
        self,
        argv: Sequence[str],
        *,
        timeout: float,
        stdin: bytes | None = None,
        cwd: str | None = None,
    ) -> CommandResult:
        deadline = Deadline(timeout)
        with self._channel(argv, deadline, cwd=cwd) as channel:
            self._feed(channel, argv, deadline, lambda stream: stream.write(stdin or b""))
            return self._finish(channel, argv, deadline)

    def run_writing(
        self, argv: Sequence[str], write: Callable[[BinaryIO], None], *, timeout: float
    ) -> CommandResult:
        deadline = Deadline(timeout)
        with self._channel(argv, deadline) as channel:
            self._feed(channel, argv, deadline, write)
            return self._finish(channel, argv, deadline)

    def run_reading(
        self, argv: Sequence[str], read: Callable[[BinaryIO], T], *, timeout: float
    ) -> tuple[T, CommandResult]:
        deadline = Deadline(timeout)
        with self._channel(argv, deadline) as channel:
            self._end_input(channel, argv)
            try:
                value = read(_ChannelReader(self, channel, argv, deadline))
            except Exception as error:
                self._raise_if_lost(channel, argv, error)
                raise
            result = self._finish(channel, argv, deadline, keep_stdout=False)
            return value, result

    def close(self) -> None:
        with self._connect_lock:
            if self._client is not None:
                self._client.close()
                self._client = None

    # -- commands ---------------------------------------------------------------------

    @contextmanager
    def _channel(
        self, argv: Sequence[str], deadline: Deadline, cwd: str | None = None
    ) -> Iterator[paramiko.Channel]:
        """An exec channel running `argv`; closed (ending our side of it) on the way out."""
        if not argv:
            raise ValueError("empty command line")
        command = shlex.join(argv)
        if cwd is not None:
            command = f"cd -- {shlex.quote(cwd)} && exec {command}"
        if not self._sessions.acquire(timeout=deadline.remaining()):
            raise command_timeout(self.host, argv, deadline.timeout)
        try:
            channel = self._open_session(deadline)
            channel.in_buffer = _ChunkPipe()  # before the command starts: nothing has arrived yet
            try:
                channel.exec_command(command)
            except _CONNECTION_ERRORS as error:
                _close_quietly(channel)
                raise HostUnreachable(self.host, f"could not start {argv[0]!r}: {error}")
            try:
                yield channel
            finally:
                _close_quietly(channel)
        finally:
            self._sessions.release()

    def _open_session(self, deadline: Deadline) -> paramiko.Channel:
        """Open a channel, reconnecting once if the shared connection turns out dead."""
        for _ in range(2):
            transport = self._connection()
            try:
                return transport.open_session(
                    window_size=CHANNEL_WINDOW,
                    max_packet_size=CHANNEL_PACKET,
                    timeout=max(deadline.remaining(), 1.0),
                )
            except paramiko.ChannelException as error:
                raise HostUnreachable(self.host, f"the server refused a session: {error}")
            except _CONNECTION_ERRORS as error:
                if transport.is_active():  # slow, not broken: other commands may be using it
                    raise HostUnreachable(self.host, f"could not open a session: {error}")
                self._forget(transport)
                lost = error
        raise HostUnreachable(self.host, f"connection lost: {lost}")

    def _feed(
        self,
        channel: paramiko.Channel,
        argv: Sequence[str],
        deadline: Deadline,
        write: Callable[[BinaryIO], None],
    ) -> None:
        """Let `write` produce the command's input, then signal its end."""
        try:
            write(_ChannelWriter(self, channel, argv, deadline))
        except _InputClosed:
            pass  # the command stopped reading: its exit code and stderr say why
        self._end_input(channel, argv)

    def _end_input(self, channel: paramiko.Channel, argv: Sequence[str]) -> None:
        try:
            channel.shutdown_write()
        except _CONNECTION_ERRORS as error:
            self._raise_if_lost(channel, argv, error)

    def _finish(
        self,
        channel: paramiko.Channel,
        argv: Sequence[str],
        deadline: Deadline,
        *,
        keep_stdout: bool = True,
    ) -> CommandResult:
        """Read what is left of stdout and stderr, then the exit status.

        Waits in paramiko's blocking recv (a condition variable) in short slices, draining
        stderr between them; selecting on a channel's fileno() proved to miss wake-ups
        when several channels are busy at once."""
        stdout: list[bytes] = []
        stderr: list[bytes] = []
        while True:
            while channel.recv_stderr_ready():
                stderr.append(channel.recv_stderr(READ_CHUNK))
            if deadline.passed:
                raise command_timeout(self.host, argv, deadline.timeout)
            channel.settimeout(min(deadline.remaining(), POLL_SLICE))
            try:
                chunk = channel.recv(READ_CHUNK)
            except socket.timeout:
                continue
            if not chunk:
                break  # end of output (or of the channel)
            if keep_stdout:
                stdout.append(chunk)
        stderr.extend(iter(lambda: channel.recv_stderr(READ_CHUNK), b""))
        if not channel.status_event.wait(deadline.remaining()):
            self._raise_if_lost(channel, argv)
            raise command_timeout(self.host, argv, deadline.timeout)
        self._raise_if_lost(channel, argv)
        return CommandResult(
            self.host, tuple(argv), channel.exit_status, b"".join(stdout), b"".join(stderr)
        )

    def _raise_if_lost(
        self, channel: paramiko.Channel, argv: Sequence[str], cause: BaseException | None = None
    ) -> None:
        """A channel closed without an exit status means the connection broke under it."""
        transport = channel.get_transport()
        if transport is not None and transport.is_active():
            return
        if channel.exit_status_ready() and channel.exit_status != -1:
            return
        self._forget(transport)
        raise HostUnreachable(
            self.host, f"connection lost while {argv[0]!r} was running"
        ) from cause

    # -- the shared connection --------------------------------------------------------

    def _connection(self) -> paramiko.Transport:
        """The live connection, opened (with backoff) if there is none."""
        asked_at = time.monotonic()
        with self._connect_lock:
            if self._client is not None:
                transport = self._client.get_transport()
                if transport is not None and transport.is_active():
                    return transport
                self._client.close()
                self._client = None
            if self._failure is not None and self._failure[0] >= asked_at:
                # another thread just gave up while we waited: don't repeat its backoff
                raise HostUnreachable(self.host, self._failure[1])
            try:
                self._client = self._connect_with_backoff()
            except _Unreachable as error:
                self._failure = (time.monotonic(), error.reason)
                raise HostUnreachable(self.host, error.reason) from None
            self.connections_opened += 1
            return self._client.get_transport()

    def _forget(self, transport: paramiko.Transport | None) -> None:
        with self._connect_lock:
            if self._client is not None and self._client.get_transport() is transport:
                self._client.close()
                self._client = None

    def _connect_with_backoff(self) -> paramiko.SSHClient:
        """Connect, retrying with exponential backoff and jitter; _Unreachable at the end."""
        delay = self.first_backoff_seconds
        for attempt in range(1, self.connect_attempts + 1):
            try:
                return self._connect_once()
            except _Unreachable as error:
                reason = error.reason
            if attempt < self.connect_attempts:
                time.sleep(delay * random.uniform(0.5, 1.5))
                delay *= 2
        raise _Unreachable(
            f"cannot connect to {self.hostname}:{self.port} "
            f"after {self.connect_attempts} attempts: {reason}"
        )

    def _connect_once(self) -> paramiko.SSHClient:
        client = paramiko.SSHClient()
        if self.known_hosts.exists():
            # as "system" keys: paramiko never rewrites this file; we only ever append to it
            client.load_system_host_keys(str(self.known_hosts))
        client.set_missing_host_key_policy(_HostKeyPolicy(self))
        explicit = self.key_file is not None or self._password is not None
        try:
            client.connect(
                self.hostname,
                port=self.port,
                username=self.username,
                pkey=self._load_key(),
                password=_reveal(self._password),
                timeout=self.connect_timeout,
                banner_timeout=self.connect_timeout,
                auth_timeout=self.connect_timeout,
                channel_timeout=self.connect_timeout,
                allow_agent=not explicit,
                look_for_keys=not explicit,
                transport_factory=_fast_transport,
            )
        except BaseException as error:
            client.close()
            raise self._classify(error) from None
        client.get_transport().set_keepalive(self.keepalive_seconds)
        return client

    def _classify(self, error: BaseException) -> BaseException:
        """Turn what paramiko or the socket raised into one of our error types."""
        if isinstance(error, HostRefused):
            return error
        if isinstance(error, paramiko.BadHostKeyException):
            return self._changed_host_key(error.key, error.expected_key)
        if isinstance(error, paramiko.AuthenticationException):
            return AuthenticationFailed(
                self.host, f"{self.username}@{self.hostname} refused our credentials: {error}"
            )
        if isinstance(error, (paramiko.SSHException, OSError, EOFError)):
            return _Unreachable(f"{type(error).__name__}: {error}")
        return error

    def _changed_host_key(self, offered: paramiko.PKey, expected: paramiko.PKey) -> HostKeyRejected:
        name = known_hosts_name(self.hostname, self.port)
        line = known_hosts_line(self.known_hosts, name, expected)
        holder = f"line {line} of {self.known_hosts}" if line else str(self.known_hosts)
        file = shlex.quote(str(self.known_hosts))
        return HostKeyRejected(
            self.host,
            f"the host key of {self.hostname}:{self.port} has CHANGED: it offered "
            f"{offered.get_name()} {fingerprint(offered)}, but {holder} holds "
            f"{fingerprint(expected)}. This can be an attack: the host is not used until an "
            f"operator acts. If the host was really reinstalled and {fingerprint(offered)} is "
            f"its new key (ask its administrator), remove the old key with "
            f"`ssh-keygen -R {shlex.quote(name)} -f {file}`, {self._accept_hint()}.",
        )

    def _accept_hint(self) -> str:
        """How an operator records a host key they have checked, and brings the host back."""
        login = shlex.quote(f"{self.username}@{self.hostname}")
        return (
            f"accept the new key once with `ssh -o UserKnownHostsFile="
            f"{shlex.quote(str(self.known_hosts))} -p {self.port} {login}`, then run "
            f"`mqi hosts` to use the host again"
        )

    def _load_key(self) -> paramiko.PKey | None:
        if self.key_file is None:
            return None
        try:
            return paramiko.PKey.from_path(self.key_file, _passphrase_bytes(self._key_passphrase))
        except FileNotFoundError:
            problem = "does not exist"
        except (paramiko.PasswordRequiredException, TypeError):  # TypeError: from cryptography
            problem = "is encrypted: set its passphrase"
        except (paramiko.SSHException, ValueError):
            problem = "cannot be read: wrong passphrase or not a private key"
        raise AuthenticationFailed(self.host, f"key file {self.key_file} {problem}")

    def _record_host_key(self, lookup_name: str, key: paramiko.PKey) -> None:
        self.known_hosts.parent.mkdir(parents=True, exist_ok=True)
        line = f"{lookup_name} {key.get_name()} {key.get_base64()}\n"
        with self.known_hosts.open("a") as known_hosts:
            known_hosts.write(line)


def known_hosts_name(hostname: str, port: int) -> str:
    """How known_hosts (and paramiko) name a host: `[host]:port` unless the port is 22."""
    return hostname if port == 22 else f"[{hostname}]:{port}"


def known_hosts_line(path: Path, name: str, key: paramiko.PKey) -> int | None:
    """The number of the line in `path` that holds `key` for `name` (plain or hashed), counted
    as OpenSSH counts them; None when it cannot be told."""
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return None
    for number, line in enumerate(lines, start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            entry = HostKeyEntry.from_line(line, number)
        except (InvalidHostKey, paramiko.SSHException, ValueError):
            continue  # a line paramiko cannot read is not the one it matched
        if entry is not None and entry.key.asbytes() == key.asbytes():
            if any(_names_host(pattern, name) for pattern in entry.hostnames):
                return number
    return None


def _names_host(pattern: str, name: str) -> bool:
    if pattern.startswith("|1|"):  # hashed (HashKnownHosts): compare the hash of our name
        return paramiko.HostKeys.hash_host(name, pattern) == pattern
    return pattern == name


class _Unreachable(Exception):
    """One connection attempt failed in a way a later attempt may not."""

    def __init__(self, reason: str):
        self.reason = reason


class _InputClosed(Exception):
    """The remote command closed its standard input while we were writing to it."""


class _HostKeyPolicy(paramiko.MissingHostKeyPolicy):
    """Called for a key not in known_hosts: refuse it, or record it when so configured."""

    def __init__(self, owner: SshTransport):
        self._owner = owner

    def missing_host_key(self, client, hostname: str, key: paramiko.PKey) -> None:
        owner = self._owner
        if not owner.accept_unknown_host_keys:
            raise HostKeyRejected(
                owner.host,
                f"unknown host key for {hostname}: {key.get_name()} {fingerprint(key)}, not "
                f"in {owner.known_hosts}: the host is not used until an operator acts. If it is "
                f"the host's key (ask its administrator), {owner._accept_hint()}; or set "
                f"accept_unknown_host_keys to record the key of a new host on first use.",
            )
        owner._record_host_key(hostname, key)
        client.get_host_keys().add(hostname, key.get_name(), key)


def _close_quietly(channel: paramiko.Channel) -> None:
    """Close our side; on a connection already gone there is nothing left to tell the server,
    and the error that ended the command is the one to report."""
    try:
        channel.close()
    except _CONNECTION_ERRORS:
        pass


class _ChannelWriter:
    """The standard input of a remote command, as a file to write to."""

    def __init__(self, owner: SshTransport, channel: paramiko.Channel, argv, deadline: Deadline):
        self._owner = owner
        self._channel = channel
        self._argv = argv
        self._deadline = deadline

    def write(self, data: bytes) -> int:
        view = memoryview(data)
        # one SSH packet per send (the server sets its size), no re-slicing of big buffers
        step = self._channel.out_max_packet_size - 64
        for start in range(0, len(view), step):
            self._send(bytes(view[start : start + step]))
        return len(view)

    def _send(self, packet: bytes) -> None:
        self._channel.settimeout(self._deadline.remaining())
        try:
            self._channel.sendall(packet)
        except socket.timeout:
            raise command_timeout(self._owner.host, self._argv, self._deadline.timeout) from None
        except _CONNECTION_ERRORS as error:
            self._owner._raise_if_lost(self._channel, self._argv, error)
            raise _InputClosed() from error

    def flush(self) -> None:
        pass


class _ChannelReader:
    """The standard output of a remote command, as a file to read from.

    `read(n)` returns between 1 and n bytes (like a raw file), or b"" at the end. It takes
    everything paramiko has buffered at once and hands it out in slices: paramiko's own
    buffer moves all it holds on every read, which is slow for many small reads."""

    def __init__(self, owner: SshTransport, channel: paramiko.Channel, argv, deadline: Deadline):
        self._owner = owner
        self._channel = channel
        self._argv = argv
        self._deadline = deadline
        self._pending = b""
        self._offset = 0

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            return b"".join(iter(lambda: self.read(READ_CHUNK), b""))
        if self._offset >= len(self._pending):
            self._pending = self._receive()
            self._offset = 0
        piece = self._pending[self._offset : self._offset + size]
        self._offset += len(piece)
        return piece

    def _receive(self) -> bytes:
        self._channel.settimeout(self._deadline.remaining())
        try:
            return self._channel.recv(CHANNEL_WINDOW)
        except socket.timeout:
            raise command_timeout(self._owner.host, self._argv, self._deadline.timeout) from None


class _ChunkPipe(BufferedPipe):
    """paramiko's buffer of what a channel received, keeping the data as the chunks it came in.

    paramiko's own keeps a byte array: every byte is copied in, and twice out (a 200 MB
    download spent 0.15 s of its 0.65 s there). Here a read of everything buffered hands a
    lone chunk over as it is, and joins several once.
    The locking and waiting stay paramiko's: only the storage (`_buffer`) is replaced."""

    def __init__(self):
        super().__init__()
        self._buffer = _Chunks()

    def _buffer_frombytes(self, data: bytes) -> None:
        self._buffer.append(data)

    def _buffer_tobytes(self, limit: int | None = None) -> bytes:
        return self._buffer.front(limit)


class _Chunks:
    """A byte queue of whole chunks, with the part of the array protocol BufferedPipe uses:
    `len`, and `del buffer[:n]` (or `[:]`) after a look at the first n bytes."""

    def __init__(self):
        self._chunks: collections.deque[bytes] = collections.deque()
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def append(self, data: bytes) -> None:
        if data:
            self._chunks.append(bytes(data))
            self._size += len(data)

    def front(self, limit: int | None) -> bytes:
        """The first `limit` bytes (all if None), left in place."""
        if limit is None or limit >= self._size:
            return b"".join(self._chunks)  # a lone chunk is returned as it is, not copied
        parts, wanted = [], limit
        for chunk in self._chunks:
            parts.append(chunk[:wanted])
            wanted -= len(parts[-1])
            if not wanted:
                break
        return b"".join(parts)

    def __delitem__(self, span: slice) -> None:
        count = self._size if span.stop is None else min(span.stop, self._size)
        self._size -= count
        while count:
            chunk = self._chunks.popleft()
            if len(chunk) > count:
                self._chunks.appendleft(chunk[count:])
                return
            count -= len(chunk)


def _fast_transport(sock, **kwargs) -> paramiko.Transport:
    transport = paramiko.Transport(sock, **kwargs)
    options = transport.get_security_options()
    options.ciphers = PREFERRED_CIPHERS + tuple(
        cipher for cipher in options.ciphers if cipher not in PREFERRED_CIPHERS
    )
    return transport


def _as_secret(value: SecretStr | str | None) -> SecretStr | None:
    if value is None or isinstance(value, SecretStr):
        return value
    return SecretStr(value)


def _reveal(value: SecretStr | None) -> str | None:
    return None if value is None else value.get_secret_value()


def _passphrase_bytes(value: SecretStr | None) -> bytes | None:
    return None if value is None else value.get_secret_value().encode()


# -- one transport per host configuration in this process --------------------------------

_shared: dict[tuple, SshTransport] = {}
_shared_lock = threading.Lock()


def shared_ssh_transport(**params) -> SshTransport:
    """The process-wide `SshTransport` for this configuration (created on first use)."""
    key = tuple(sorted((name, _hashable(value)) for name, value in params.items()))
    with _shared_lock:
        transport = _shared.get(key)
        if transport is None:
            transport = _shared[key] = SshTransport(**params)
        return transport


def _hashable(value):
    if isinstance(value, SecretStr):
        return ("secret", hashlib.sha256(value.get_secret_value().encode()).hexdigest())
    if isinstance(value, Path):
        return str(value.expanduser())
    return value
