"""A real OpenSSH server on 127.0.0.1 for tests and benchmarks.

`OpenSshServer` is a plain class (the benchmarks use it directly); the fixtures `sshd` (one
server for the whole session) and `sshd_factory` (more independent servers, for tests with
several hosts) wrap it. Each server has its own host key, client keys, authorized_keys and a
known_hosts file for clients, all in its own temporary folder, and listens on a free port.
"""

from __future__ import annotations

import getpass
import os
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

SSHD = Path("/usr/sbin/sshd")
PRIVSEP_DIR = Path("/run/sshd")
KEY_PASSPHRASE = "correct horse battery staple"
START_TIMEOUT = 10.0


def generate_key(path: Path, passphrase: str = "") -> Path:
    """Write a new ed25519 key pair (`path` and `path`.pub) and return `path`."""
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", passphrase, "-C", path.name, "-f", str(path)],
        check=True,
        capture_output=True,
    )
    return path


def sha256_fingerprint(public_key_file: Path) -> str:
    """The `SHA256:...` fingerprint OpenSSH prints for a public key."""
    out = subprocess.run(
        ["ssh-keygen", "-l", "-E", "sha256", "-f", str(public_key_file)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return out.split()[1]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _root_account_locked(username: str) -> bool:
    """Without PAM, sshd refuses every login to an account whose password starts with '!'."""
    try:
        for line in Path("/etc/shadow").read_text().splitlines():
            name, _, rest = line.partition(":")
            if name == username:
                return rest.startswith("!")
    except OSError:
        pass
    return False


class OpenSshServer:
    """One `sshd -D` process with its own keys and files under `workdir`."""

    hostname = "127.0.0.1"

    def __init__(self, workdir: Path, log_level: str = "ERROR"):
        """`log_level` VERBOSE logs every connection (see `connections_seen`)."""
        if not SSHD.exists():
            raise RuntimeError(
                f"{SSHD} not found: install the OpenSSH server (apt-get install openssh-server)"
            )
        PRIVSEP_DIR.mkdir(mode=0o755, parents=True, exist_ok=True)
        self.workdir = workdir
        self.username = getpass.getuser()
        self.port = free_port()
        self.host_key = generate_key(workdir / "ssh_host_ed25519_key")
        self.key_file = generate_key(workdir / "client_key")
        self.encrypted_key_file = generate_key(workdir / "client_key_encrypted", KEY_PASSPHRASE)
        self.key_passphrase = KEY_PASSPHRASE
        self.host_key_fingerprint = sha256_fingerprint(self.host_key.with_suffix(".pub"))
        self.known_hosts = workdir / "known_hosts"
        self.log_file = workdir / "sshd.log"
        self.log_level = log_level
        self._authorized_keys = workdir / "authorized_keys"
        self._authorized_keys.write_text(
            "".join(
                Path(f"{key}.pub").read_text() for key in (self.key_file, self.encrypted_key_file)
            )
        )
        self._process: subprocess.Popen | None = None

    # -- files ------------------------------------------------------------------------

    @property
    def known_hosts_line(self) -> str:
        key_type, key_data = self.host_key.with_suffix(".pub").read_text().split()[:2]
        return f"[{self.hostname}]:{self.port} {key_type} {key_data}\n"

    def _write_files(self) -> Path:
        self.known_hosts.write_text(self.known_hosts_line)
        config = self.workdir / "sshd_config"
        use_pam = "yes" if _root_account_locked(self.username) else "no"
        config.write_text(
            f"""\
Port {self.port}
ListenAddress {self.hostname}
HostKey {self.host_key}
PidFile {self.workdir / "sshd.pid"}
AuthorizedKeysFile {self._authorized_keys}
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
StrictModes no
UsePAM {use_pam}
MaxStartups 200:30:400
MaxSessions 10
LogLevel {self.log_level}
Subsystem sftp internal-sftp
"""
        )
        return config

    def connections_seen(self) -> int:
        """Connections the server accepted so far (counted only at log_level VERBOSE), including
        the probes of `start`."""
        if not self.log_file.exists():
            return 0
        return self.log_file.read_text(errors="replace").count("Connection from ")

    def replace_host_key(self) -> None:
        """The host reinstalled: a new host key, so clients that knew the old one refuse it.
        A running server restarts with it (its connections are cut)."""
        was_running = self.running
        self.stop()
        self.host_key.unlink()
        self.host_key.with_suffix(".pub").unlink()
        generate_key(self.host_key)
        self.host_key_fingerprint = sha256_fingerprint(self.host_key.with_suffix(".pub"))
        if was_running:
            self.start()

    # -- life cycle -------------------------------------------------------------------

    def start(self) -> None:
        """Start listening (again) on the same port with the same keys."""
        if self.running:
            return
        config = self._write_files()
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            with self.log_file.open("ab") as log:
                self._process = subprocess.Popen(
                    [str(SSHD), "-D", "-e", "-f", str(config)],
                    stdout=log,
                    stderr=log,
                    start_new_session=True,
                )
            if self._wait_for_banner(deadline):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"sshd did not start: {self.log_file.read_text()[-2000:]}")
            time.sleep(0.2)  # port still held by a previous life: try again

    def _wait_for_banner(self, deadline: float) -> bool:
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                return False
            try:
                with socket.create_connection((self.hostname, self.port), timeout=1) as conn:
                    if conn.recv(8).startswith(b"SSH-"):
                        return True
            except OSError:
                time.sleep(0.05)
        return False

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def kill_sessions(self) -> int:
        """Kill every per-connection sshd process, cutting live connections; keep listening."""
        if self._process is None:
            return 0
        victims = _descendants(self._process.pid)
        for pid in victims:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        _release_pyenv_rehash_lock()
        return len(victims)

    def stop(self) -> None:
        """A full outage: live connections are cut and nothing listens on the port."""
        if self._process is None:
            return
        self.kill_sessions()
        self._process.terminate()
        try:
            self._process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        self._process = None

    # -- clients ----------------------------------------------------------------------

    def openssh_client_options(self) -> list[str]:
        """Options that make `ssh`/`scp` talk to this server with its client key."""
        return [
            "-i", str(self.key_file),
            "-o", f"UserKnownHostsFile={self.known_hosts}",
            "-o", "StrictHostKeyChecking=yes",
            "-o", "BatchMode=yes",
            "-o", "IdentitiesOnly=yes",
            "-F", "/dev/null",
        ]  # fmt: skip

    def transport_params(self, host: str = "test-host") -> dict:
        """Keyword arguments for `SshTransport` that reach this server with the plain key."""
        return {
            "host": host,
            "hostname": self.hostname,
            "port": self.port,
            "username": self.username,
            "key_file": self.key_file,
            "known_hosts": self.known_hosts,
        }


def _release_pyenv_rehash_lock() -> None:
    """Remove the lock a killed `pyenv rehash` leaves behind.

    On machines whose ~/.bashrc runs `pyenv init`, every remote command runs `pyenv rehash`,
    which holds `$PYENV_ROOT/shims/.pyenv-shim` while it works. Killing a session mid-rehash
    leaves that file, and every later remote shell then waits 60 s for it.
    """
    root = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv"))
    (root / "shims" / ".pyenv-shim").unlink(missing_ok=True)


def _descendants(pid: int) -> list[int]:
    """Every process below `pid` (read from /proc), children first."""
    children_of: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        children_of.setdefault(parent, []).append(int(entry.name))
    found: list[int] = []
    pending = list(children_of.get(pid, []))
    while pending:
        child = pending.pop()
        found.append(child)
        pending.extend(children_of.get(child, []))
    return found


class SshdFactory:
    """Starts independent servers and stops them all at the end."""

    def __init__(self, root: Path):
        self._root = root
        self._servers: list[OpenSshServer] = []

    def __call__(self, **options) -> OpenSshServer:
        """A started server; `options` go to OpenSshServer (log_level)."""
        workdir = Path(tempfile.mkdtemp(prefix="sshd-", dir=self._root))
        try:
            server = OpenSshServer(workdir, **options)
        except RuntimeError as missing:
            pytest.fail(str(missing), pytrace=False)
        self._servers.append(server)
        server.start()
        return server

    def stop_all(self) -> None:
        for server in self._servers:
            server.stop()


@pytest.fixture(scope="session")
def sshd_factory(tmp_path_factory) -> Iterator[SshdFactory]:
    factory = SshdFactory(tmp_path_factory.mktemp("sshd-servers"))
    yield factory
    factory.stop_all()


@pytest.fixture(scope="session")
def sshd(sshd_factory) -> OpenSshServer:
    """The session's shared server. Tests that stop it must start it again (or use
    `sshd_factory` for a private one)."""
    return sshd_factory()


@pytest.fixture(scope="session")
def ssh_transport(sshd):
    """An `SshTransport` to the session's server (its one shared connection)."""
    from mqi.transport.ssh import SshTransport

    transport = SshTransport(
        **sshd.transport_params(), connect_attempts=3, first_backoff_seconds=0.2
    )
    yield transport
    transport.close()


@pytest.fixture(params=["local", "ssh"])
def each_transport(request):
    """Runs a test once over LocalTransport and once over SSH to the session's server."""
    if request.param == "local":
        from mqi.transport.local import LocalTransport

        return LocalTransport("local-test")
    return request.getfixturevalue("ssh_transport")
