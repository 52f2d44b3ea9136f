"""SshTransport against a real OpenSSH server: host keys, credentials, outages, sharing."""

from __future__ import annotations

import logging
import re
import shlex
import subprocess
import threading
import time
from pathlib import Path

import pytest
from pydantic import SecretStr

from mqi.transport.base import AuthenticationFailed, HostKeyRejected, HostRefused, HostUnreachable
from mqi.transport.ssh import SshTransport, shared_ssh_transport
from tests.support.sshd import generate_key

QUICK_RETRY = {"connect_attempts": 2, "first_backoff_seconds": 0.1, "connect_timeout": 5}


def transport_for(server, **changes) -> SshTransport:
    return SshTransport(**{**server.transport_params(), **QUICK_RETRY, **changes})


def other_host_key_line(server, tmp_path: Path) -> str:
    key = generate_key(tmp_path / "impostor_host_key")
    key_type, key_data = Path(f"{key}.pub").read_text().split()[:2]
    return f"[{server.hostname}]:{server.port} {key_type} {key_data}\n"


# -- host keys ---------------------------------------------------------------------------


def test_unknown_host_key_is_refused_with_its_fingerprint(sshd, tmp_path):
    empty = tmp_path / "known_hosts"
    empty.write_text("")

    with pytest.raises(HostKeyRejected) as refused:
        transport_for(sshd, known_hosts=empty).run(["true"], timeout=20)

    assert sshd.host_key_fingerprint in str(refused.value)
    assert "unknown host key" in str(refused.value)
    assert isinstance(refused.value, HostRefused) and not refused.value.transient
    assert empty.read_text() == ""  # nothing recorded without the opt-in


def test_changed_host_key_is_refused(sshd, tmp_path):
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(other_host_key_line(sshd, tmp_path))

    with pytest.raises(HostKeyRejected) as refused:
        transport_for(sshd, known_hosts=known_hosts, accept_unknown_host_keys=True).run(
            ["true"], timeout=20
        )

    assert "CHANGED" in str(refused.value)
    assert sshd.host_key_fingerprint in str(refused.value)


@pytest.mark.parametrize("hashed", [False, True], ids=["plain", "hashed"])
def test_a_changed_host_key_needs_an_operator_and_its_message_names_the_fix(sshd, tmp_path, hashed):
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text("# the GPU hosts\n" + other_host_key_line(sshd, tmp_path))
    if hashed:  # as OpenSSH writes it with HashKnownHosts (Debian's default)
        subprocess.run(["ssh-keygen", "-H", "-f", str(known_hosts)], check=True, capture_output=True)
    transport = transport_for(sshd, known_hosts=known_hosts)

    with pytest.raises(HostRefused) as refused:
        transport.run(["true"], timeout=20)

    assert not refused.value.transient  # not a network fault: nothing retries it with back-off
    message = str(refused.value)
    assert f"line 2 of {known_hosts}" in message  # where the old key is, as `ssh` would say
    # The fix the message names works: the old key removed, the new one accepted, connected.
    [remove] = [command for command in re.findall(r"`([^`]+)`", message) if command.startswith("ssh-keygen -R ")]
    subprocess.run(shlex.split(remove), check=True, capture_output=True)
    with known_hosts.open("a") as file:
        file.write(sshd.known_hosts_line)  # what `ssh` records once the operator accepts the key
    transport.run(["true"], timeout=20).check()


def test_accepting_unknown_keys_records_the_key_on_first_use(sshd, tmp_path):
    known_hosts = tmp_path / "new" / "known_hosts"

    transport_for(sshd, known_hosts=known_hosts, accept_unknown_host_keys=True).run(
        ["true"], timeout=20
    ).check()

    assert known_hosts.read_text() == sshd.known_hosts_line
    # from now on the key is known: a transport without the opt-in connects
    transport_for(sshd, known_hosts=known_hosts).run(["true"], timeout=20).check()


# -- credentials -------------------------------------------------------------------------


def test_a_key_the_server_does_not_know_is_refused(sshd, tmp_path):
    stranger = generate_key(tmp_path / "stranger")

    with pytest.raises(AuthenticationFailed, match="refused our credentials"):
        transport_for(sshd, key_file=stranger).run(["true"], timeout=20)


def test_encrypted_key_with_its_passphrase(sshd, caplog):
    caplog.set_level(logging.DEBUG)
    passphrase = SecretStr(sshd.key_passphrase)
    transport = transport_for(
        sshd, key_file=sshd.encrypted_key_file, key_passphrase=passphrase
    )

    assert transport.run(["echo", "in"], timeout=20).check().out == "in\n"
    assert sshd.key_passphrase not in repr(transport) + str(transport) + str(vars(transport))
    assert sshd.key_passphrase not in caplog.text


@pytest.mark.parametrize(
    ("passphrase", "problem"),
    [
        (None, "is encrypted: set its passphrase"),
        ("not-it-4711", "cannot be read: wrong passphrase"),
    ],
)
def test_encrypted_key_without_the_right_passphrase(sshd, passphrase, problem):
    secret = SecretStr(passphrase) if passphrase else None
    transport = transport_for(sshd, key_file=sshd.encrypted_key_file, key_passphrase=secret)

    with pytest.raises(AuthenticationFailed) as refused:
        transport.run(["true"], timeout=20)

    assert f"key file {sshd.encrypted_key_file} {problem}" in str(refused.value)
    assert "not-it-4711" not in str(refused.value)


def test_a_password_never_shows(sshd, caplog):
    caplog.set_level(logging.DEBUG)
    password = "hunter2-very-secret"
    transport = SshTransport(
        **{**sshd.transport_params(), **QUICK_RETRY, "key_file": None},
        password=SecretStr(password),
    )

    with pytest.raises(AuthenticationFailed) as refused:  # the server allows keys only
        transport.run(["true"], timeout=20)

    shown = str(refused.value) + repr(refused.value) + repr(transport) + str(vars(transport))
    assert password not in shown + caplog.text


def test_a_missing_key_file_is_named(sshd, tmp_path):
    missing = tmp_path / "no_such_key"

    with pytest.raises(AuthenticationFailed, match="no_such_key does not exist"):
        transport_for(sshd, key_file=missing).run(["true"], timeout=20)


# -- outages -----------------------------------------------------------------------------


def test_outage_then_the_same_transport_reconnects(sshd_factory):
    server = sshd_factory()
    transport = transport_for(server)
    transport.run(["true"], timeout=20).check()

    server.stop()
    with pytest.raises(HostUnreachable) as down:
        transport.run(["true"], timeout=20)
    assert down.value.transient
    assert "after 2 attempts" in str(down.value)

    server.start()
    assert transport.run(["echo", "back"], timeout=20).check().out == "back\n"
    assert transport.connections_opened == 2


def test_connection_cut_during_a_command_is_unreachable_not_a_timeout(sshd_factory):
    server = sshd_factory()
    transport = transport_for(server)
    cutter = threading.Timer(1.0, server.kill_sessions)
    cutter.start()

    started = time.monotonic()
    with pytest.raises(HostUnreachable, match="connection lost"):
        transport.run(["sleep", "30"], timeout=60)
    assert time.monotonic() - started < 15
    cutter.join()

    assert transport.run(["true"], timeout=20).exit_code == 0  # reconnects


def test_connection_cut_while_writing_a_commands_input_is_unreachable(sshd_factory):
    """However paramiko reports the cut (OSError, EOFError), the writer sees the host lost."""
    server = sshd_factory()
    transport = transport_for(server)
    block = b"x" * (1 << 20)

    def write(stream):
        stream.write(block)
        server.kill_sessions()
        for _ in range(500):  # until the cut reaches the sender
            stream.write(block)

    with pytest.raises(HostUnreachable, match="connection lost"):
        transport.run_writing(["sh", "-c", "cat > /dev/null"], write, timeout=60)
    assert transport.run(["true"], timeout=20).exit_code == 0  # reconnects


def test_nothing_listening_is_unreachable(sshd_factory):
    server = sshd_factory()
    server.stop()

    with pytest.raises(HostUnreachable, match="cannot connect"):
        transport_for(server).run(["true"], timeout=20)


# -- one connection per host -------------------------------------------------------------


def test_threads_share_one_connection(sshd_factory):
    server = sshd_factory()  # MaxSessions 10 on this server: more would be refused
    transport = transport_for(server)
    outputs: list[str] = []
    errors: list[BaseException] = []

    def work(index: int) -> None:
        try:
            result = transport.run(["sh", "-c", f"sleep 0.3; echo {index}"], timeout=60)
            outputs.append(result.check().out.strip())
        except BaseException as error:  # collected: a thread's failure must fail the test
            errors.append(error)

    threads = [threading.Thread(target=work, args=(index,)) for index in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert errors == []
    assert sorted(outputs, key=int) == [str(index) for index in range(20)]
    assert transport.connections_opened == 1


def test_shared_transport_is_one_per_configuration(sshd):
    params = sshd.transport_params("shared-host")

    first = shared_ssh_transport(**params)

    assert shared_ssh_transport(**params) is first
    assert shared_ssh_transport(**{**params, "port": sshd.port + 1}) is not first
    assert shared_ssh_transport(**{**params, "key_passphrase": SecretStr("a")}) is not first


@pytest.mark.parametrize("seed", range(10))
def test_channel_buffer_hands_out_the_bytes_paramiko_s_own_would(seed):
    """The chunk buffer on our channels reads exactly as paramiko's BufferedPipe: the same bytes
    in the same order, for any mix of chunk and read sizes."""
    import random

    from paramiko.buffered_pipe import BufferedPipe

    from mqi.transport.ssh import _ChunkPipe

    rng = random.Random(seed)
    ours, theirs = _ChunkPipe(), BufferedPipe()
    ours_ready, theirs_ready = threading.Event(), threading.Event()  # what select() on the channel sees
    ours.set_event(ours_ready)
    theirs.set_event(theirs_ready)
    for _ in range(300):
        action = rng.random()
        if action < 0.5:
            chunk = rng.randbytes(rng.choice([0, 1, 7, 4096, 33000]))
            ours.feed(chunk)
            theirs.feed(chunk)
        elif action < 0.95 and theirs.read_ready():
            size = rng.choice([1, 5, 1000, 40000, 10**7])
            assert ours.read(size, timeout=0.0) == theirs.read(size, timeout=0.0)
        elif action >= 0.95:
            assert ours.empty() == theirs.empty()
        assert len(ours._buffer) == len(theirs._buffer) and ours.read_ready() == theirs.read_ready()
        assert ours_ready.is_set() == theirs_ready.is_set()
    ours.close()
    theirs.close()  # the end of the stream with data still buffered: it is all read, then b""
    while (expected := theirs.read(3000)) != b"":
        assert ours.read(3000) == expected
    assert ours.read(3000) == b""


def test_channel_buffer_gives_a_lone_chunk_without_copying_and_waits_like_paramiko():
    from paramiko.buffered_pipe import PipeTimeout

    from mqi.transport.ssh import _ChunkPipe

    pipe = _ChunkPipe()
    chunk = b"x" * 100_000
    pipe.feed(chunk)
    assert pipe.read(1 << 24) is chunk  # the point of it: no copy of a large packet
    with pytest.raises(PipeTimeout):
        pipe.read(10, timeout=0.05)
    threading.Timer(0.05, pipe.feed, args=(b"late",)).start()
    assert pipe.read(10, timeout=5) == b"late"  # a waiting read is woken by what arrives
    pipe.close()
    assert pipe.read(10) == b""  # closed and empty: the end of the stream
