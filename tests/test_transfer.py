"""Case transfer over LocalTransport and over SSH to a real sshd: exact copies, refusals,
idempotent uploads, and damaged or interrupted transfers that never look complete."""

from __future__ import annotations

import io
import os
import shutil
import stat
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from mqi.transfer import (
    CaseInputError,
    RemoteResultsMissing,
    ResultsRefused,
    TransferVerificationFailed,
    download_results,
    remove_remote_dir,
    upload_case,
)
from mqi.transport.base import HostUnreachable, Transport
from mqi.transport.local import LocalTransport
from mqi.transport.ssh import SshTransport

TIMEOUT = 60
MARKER = b"PAYLOAD-MARKER"
CANARY = f"CANARY-{uuid.uuid4().hex[:8]}"
ODD_NAMES = [
    "with space.txt",
    "quote'single",
    'quote"double',
    "semi;colon; touch " + CANARY,
    f"$(touch {CANARY})",
    f"`touch {CANARY}`",
    "new\nline",
    "-leading-dash",
    "--also=option",
    os.fsdecode(b"not-utf8-\xff\xfe"),
    "ünïcødé ✓",
    "back\\slash",
    ".mqi-manifest.json",  # the name our stream gives its manifest: told apart by a mark
    "x" * 200,  # longer than a plain tar header holds
]


# -- building and reading folders --------------------------------------------------------


def make_case(root: Path) -> Path:
    case = root / "case"
    (case / "beams" / "beam 1").mkdir(parents=True)
    (case / "empty folder" / "nested empty").mkdir(parents=True)
    (case / "plan.dcm").write_bytes(os.urandom(300_000) + MARKER + os.urandom(1000))
    (case / "beams" / "beam 1" / "spots.csv").write_text("x,y\n1,2\n")
    (case / "run.sh").write_text("#!/bin/sh\necho run\n")
    (case / "run.sh").chmod(0o750)
    (case / "private.txt").write_text("p")
    (case / "private.txt").chmod(0o600)
    (case / "empty.bin").write_bytes(b"")
    (case / "beams" / "latest").symlink_to("beam 1")
    for name in ODD_NAMES:
        (case / name).write_text(f"content of {name!r}")
    return case


def snapshot(root: Path) -> dict[bytes, tuple]:
    """Everything that must survive a copy: relative path, type, mode, content or target."""
    found = {}
    base = os.fsencode(root)
    for folder, dirs, files in os.walk(base):
        for name in dirs + files:
            path = os.path.join(folder, name)
            st = os.lstat(path)
            relative = os.path.relpath(path, base)
            if stat.S_ISLNK(st.st_mode):
                found[relative] = ("link", os.readlink(path))
            elif stat.S_ISDIR(st.st_mode):
                found[relative] = ("dir", stat.S_IMODE(st.st_mode))
            elif not stat.S_ISREG(st.st_mode):  # a named pipe: reading it would wait for ever
                found[relative] = ("special", st.st_mode)
            else:
                content = Path(os.fsdecode(path)).read_bytes()
                found[relative] = ("file", stat.S_IMODE(st.st_mode), content)
    return found


def assert_no_canary(tmp_path: Path) -> None:
    """A name run by a shell would have made a file named exactly CANARY in the working
    folder of that shell (home over SSH, ours locally) or near the copies."""
    for place in (Path.home(), Path.cwd(), Path("/tmp")):
        assert not (place / CANARY).exists()
    assert list(tmp_path.rglob(CANARY)) == []


def leftovers(parent: Path) -> list[str]:
    return [name for name in os.listdir(parent) if ".mqi-" in name] if parent.exists() else []


def wait_until(condition: Callable[[], bool], seconds: float = 10) -> bool:
    """For the remote side, which cleans up on its own after we hang up."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


class Tapped(Transport):
    """A transport that lets a test see or alter the streams, and counts what was sent."""

    def __init__(
        self, inner: Transport, *, on_write=None, on_read=None, before_write=None, prefix=()
    ):
        self.inner = inner
        self.host = inner.host
        self.prefix = list(prefix)  # put in front of every command line
        self.on_write = on_write or (lambda stream: stream)
        self.on_read = on_read or (lambda stream: stream)
        self.before_write = before_write or (lambda: None)
        self.bytes_sent = 0

    def run(self, argv, *, timeout, stdin=None, cwd=None):
        return self.inner.run([*self.prefix, *argv], timeout=timeout, stdin=stdin, cwd=cwd)

    def run_writing(self, argv, write, *, timeout):
        self.before_write()
        return self.inner.run_writing(
            [*self.prefix, *argv],
            lambda stream: write(self.on_write(_Counting(stream, self))),
            timeout=timeout,
        )

    def run_reading(self, argv, read, *, timeout):
        return self.inner.run_reading(
            argv, lambda stream: read(self.on_read(stream)), timeout=timeout
        )


class _Counting:
    def __init__(self, stream, tap: Tapped):
        self.stream = stream
        self.tap = tap

    def write(self, data):
        self.tap.bytes_sent += len(data)
        return self.stream.write(data)

    def flush(self):
        self.stream.flush()


class Corrupting:
    """Flips one byte of the payload as it passes (what a broken link or disk would do)."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, data):
        return self.stream.write(bytes(data).replace(MARKER, MARKER[:-1] + b"X"))

    def read(self, size=-1):
        return self.stream.read(size).replace(MARKER, MARKER[:-1] + b"X")

    def flush(self):
        self.stream.flush()


class CutAfter:
    """Stops the stream after `limit` bytes by raising (the sender died mid-way)."""

    def __init__(self, stream, limit: int):
        self.stream = stream
        self.left = limit

    def write(self, data):
        if len(data) > self.left:
            raise ConnectionAbortedError("sender died")
        self.left -= len(data)
        return self.stream.write(data)

    def flush(self):
        self.stream.flush()


# -- copies are exact and nothing in a name is run ---------------------------------------


def test_round_trip_keeps_everything_and_runs_nothing(each_transport, tmp_path):
    case = make_case(tmp_path)
    remote = tmp_path / "host" / "work" / "uid-1" / "input"  # parents do not exist yet
    back = tmp_path / "back"

    sent = upload_case(each_transport, case, str(remote), timeout=TIMEOUT)
    got = download_results(each_transport, str(remote), back, timeout=TIMEOUT)

    assert snapshot(remote) == snapshot(case)
    assert snapshot(back) == snapshot(case)
    assert sent == got
    assert not sent.reused
    assert sent.file_count == 5 + len(ODD_NAMES)
    files = [path for path in case.rglob("*") if path.is_file() and not path.is_symlink()]
    assert sent.total_bytes == sum(path.stat().st_size for path in files)
    assert leftovers(remote.parent) == [] and leftovers(tmp_path) == []
    assert_no_canary(tmp_path)


# -- what a case folder may not hold -----------------------------------------------------


def _escaping_link(case: Path) -> str:
    (case / "beams" / "leak").symlink_to("../../outside.txt")
    return "'beams/leak' is a symbolic link leaving the folder"


def _absolute_link(case: Path) -> str:
    (case / "abs").symlink_to(case / "plan.dcm")
    return "'abs' is a symbolic link to an absolute path"


def _fifo(case: Path) -> str:
    os.mkfifo(case / "beams" / "pipe")
    return "'beams/pipe' is a named pipe (FIFO), not a file"


def _device(case: Path) -> str:
    try:
        os.mknod(case / "null", stat.S_IFCHR | 0o600, os.makedev(1, 3))
    except PermissionError:
        pytest.skip("making a device file needs root")
    return "'null' is a character device, not a file"


def _escaping_chain(case: Path) -> str:
    # each link alone reads as inside; followed, `climb` ends above the folder
    (case / "beams" / "beam 1" / "top").symlink_to("../..")
    (case / "climb").symlink_to("beams/beam 1/top/..")
    return "'climb' is a symbolic link leaving the folder"


@pytest.mark.parametrize("spoil", [_escaping_link, _absolute_link, _escaping_chain, _fifo, _device])
def test_refused_entries_are_named_and_nothing_is_sent(tmp_path, spoil):
    case = make_case(tmp_path)
    expected = spoil(case)
    transport = Tapped(LocalTransport())
    remote = tmp_path / "remote"

    with pytest.raises(CaseInputError) as refused:
        upload_case(transport, case, str(remote), timeout=TIMEOUT)

    assert expected in str(refused.value)
    assert str(case) in str(refused.value)
    assert transport.bytes_sent == 0
    assert not remote.exists()


def test_unreadable_file_is_refused(tmp_path):
    """Root reads any file whatever its mode, so the upload runs in a child process without
    the capabilities that let root bypass permissions (CAP_DAC_OVERRIDE/READ_SEARCH)."""
    case = make_case(tmp_path)
    secret = case / "beams" / "locked.dat"
    secret.write_text("no")
    secret.chmod(0o000)
    prefix = []
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("setpriv (util-linux) is needed to drop root's read-anything power")
        prefix = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search"]
    script = (
        "import sys; from pathlib import Path\n"
        "from mqi.transfer import upload_case, CaseInputError\n"
        "from mqi.transport.local import LocalTransport\n"
        "try:\n"
        "    upload_case(LocalTransport(), Path(sys.argv[1]), sys.argv[2], timeout=60)\n"
        "except CaseInputError as error:\n"
        "    print(error)\n"
    )
    child = subprocess.run(
        [*prefix, sys.executable, "-c", script, str(case), str(tmp_path / "remote")],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
    )

    assert "'beams/locked.dat' cannot be read (permission denied)" in child.stdout, child.stderr
    assert not (tmp_path / "remote").exists()


def test_a_file_changing_while_read_is_refused(each_transport, tmp_path):
    case = make_case(tmp_path)
    remote = tmp_path / "remote"

    def change_a_file():
        with (case / "beams" / "beam 1" / "spots.csv").open("a") as spots:
            spots.write("3,4\n")

    with pytest.raises(CaseInputError, match="'beams/beam 1/spots.csv' changed while"):
        upload_case(
            Tapped(each_transport, before_write=change_a_file), case, str(remote), timeout=TIMEOUT
        )

    assert wait_until(lambda: leftovers(tmp_path) == [])
    assert not remote.exists()


def test_missing_case_folder(tmp_path):
    with pytest.raises(CaseInputError, match="does not exist"):
        upload_case(LocalTransport(), tmp_path / "nope", str(tmp_path / "remote"), timeout=TIMEOUT)


# -- uploads are idempotent --------------------------------------------------------------


def test_an_upload_already_in_place_is_not_sent_again(each_transport, tmp_path):
    case = make_case(tmp_path)
    remote = tmp_path / "remote"
    first = upload_case(each_transport, case, str(remote), timeout=TIMEOUT)
    before = (remote.stat().st_ino, (remote / "plan.dcm").stat().st_ino)
    transport = Tapped(each_transport)

    again = upload_case(transport, case, str(remote), timeout=TIMEOUT)

    assert again.reused and again == first
    assert transport.bytes_sent == 0
    assert (remote.stat().st_ino, (remote / "plan.dcm").stat().st_ino) == before


def test_a_first_upload_does_not_look_first_and_replaces_whatever_is_there(each_transport, tmp_path):
    case = make_case(tmp_path)
    remote = tmp_path / "remote"
    upload_case(each_transport, case, str(remote), timeout=TIMEOUT)
    (remote / "stray.txt").write_text("left by someone")
    commands = []
    transport = Tapped(each_transport)
    transport.run = lambda argv, **kwargs: commands.append(argv) or each_transport.run(argv, **kwargs)

    again = upload_case(transport, case, str(remote), timeout=TIMEOUT, may_be_there=False)

    assert commands == []  # only the receiver ran: no manifest asked for
    assert not again.reused and transport.bytes_sent > 0
    assert not (remote / "stray.txt").exists() and (remote / "plan.dcm").exists()


def test_same_sizes_but_other_content_is_sent_again(each_transport, tmp_path):
    case = make_case(tmp_path)
    remote = tmp_path / "remote"
    upload_case(each_transport, case, str(remote), timeout=TIMEOUT)
    (case / "private.txt").write_text("q")  # same size, same listing

    again = upload_case(each_transport, case, str(remote), timeout=TIMEOUT)

    assert not again.reused
    assert (remote / "private.txt").read_text() == "q"


def test_a_partial_upload_is_replaced(each_transport, tmp_path):
    case = make_case(tmp_path)
    remote = tmp_path / "remote"
    shutil.copytree(case, remote, symlinks=True)
    (remote / "plan.dcm").write_bytes(b"truncated")
    (remote / "run.sh").unlink()
    (remote / "stale.txt").write_text("from an older upload")

    upload_case(each_transport, case, str(remote), timeout=TIMEOUT)

    assert snapshot(remote) == snapshot(case)


def test_a_greeting_printed_before_the_command_is_tolerated(each_transport, tmp_path):
    """Login scripts on some hosts print a line before any command runs."""
    case = make_case(tmp_path)
    greeting = ["sh", "-c", 'echo "Welcome to gpu1"; exec "$@"', "greeter"]
    remote = tmp_path / "remote"

    upload_case(Tapped(each_transport, prefix=greeting), case, str(remote), timeout=TIMEOUT)
    again = upload_case(Tapped(each_transport, prefix=greeting), case, str(remote), timeout=TIMEOUT)

    assert again.reused
    assert snapshot(remote) == snapshot(case)


# -- damaged or interrupted transfers never look complete --------------------------------


def test_damaged_upload_is_detected_and_not_put_in_place(each_transport, tmp_path):
    case = make_case(tmp_path)
    remote = tmp_path / "remote"

    with pytest.raises(TransferVerificationFailed, match="does not match what was sent") as failed:
        upload_case(Tapped(each_transport, on_write=Corrupting), case, str(remote), timeout=TIMEOUT)

    assert failed.value.transient
    assert "'plan.dcm'" in str(failed.value)
    assert not remote.exists()
    assert leftovers(tmp_path) == []


def test_upload_cut_short_leaves_nothing_in_place(each_transport, tmp_path):
    case = make_case(tmp_path)
    remote = tmp_path / "remote"
    cut = Tapped(each_transport, on_write=lambda stream: CutAfter(stream, 100_000))

    with pytest.raises(ConnectionAbortedError):
        upload_case(cut, case, str(remote), timeout=TIMEOUT)

    assert wait_until(lambda: leftovers(tmp_path) == [])
    assert not remote.exists()
    upload_case(each_transport, case, str(remote), timeout=TIMEOUT)  # the retry completes
    assert snapshot(remote) == snapshot(case)


def test_damaged_download_keeps_the_previous_results(each_transport, tmp_path):
    case = make_case(tmp_path)
    dest = tmp_path / "results"
    dest.mkdir()
    (dest / "old.txt").write_text("previous results")

    with pytest.raises(TransferVerificationFailed, match="'plan.dcm'"):
        download_results(
            Tapped(each_transport, on_read=Corrupting), str(case), dest, timeout=TIMEOUT
        )

    assert snapshot(dest) == {b"old.txt": ("file", 0o644, b"previous results")}
    assert leftovers(tmp_path) == []

    download_results(each_transport, str(case), dest, timeout=TIMEOUT)
    assert snapshot(dest) == snapshot(case)  # replaced only by a verified copy


def test_missing_results_folder(each_transport, tmp_path):
    dest = tmp_path / "results"

    with pytest.raises(RemoteResultsMissing, match="no results folder"):
        download_results(each_transport, str(tmp_path / "nothing"), dest, timeout=TIMEOUT)

    assert not dest.exists() and leftovers(tmp_path) == []


# -- results are never read through a link out of them ----------------------------------


def make_remote_case(root: Path) -> tuple[Path, Path]:
    """A case folder on the host (its output not made yet), and a folder outside it."""
    elsewhere = root / "elsewhere"
    (elsewhere / "output").mkdir(parents=True)
    (elsewhere / "output" / "other-patient.dcm").write_text("not this case's")
    case_dir = root / "host" / "uid-1"
    (case_dir / "input").mkdir(parents=True)
    (case_dir / "input" / "plan.dcm").write_text("plan")
    return case_dir, elsewhere


def _output_linked_outside(case_dir: Path, elsewhere: Path) -> tuple[Path, str]:
    (case_dir / "output").symlink_to(elsewhere / "output")
    return case_dir / "output", "'output' is a symbolic link (to "


def _output_linked_inside(case_dir: Path, elsewhere: Path) -> tuple[Path, str]:
    (case_dir / "scratch").mkdir()
    (case_dir / "scratch" / "dose.dcm").write_text("dose")
    (case_dir / "output").symlink_to("scratch")
    return case_dir / "output", "'output' is a symbolic link (to 'scratch')"


def _folder_above_output_linked(case_dir: Path, elsewhere: Path) -> tuple[Path, str]:
    (case_dir / "run").symlink_to(elsewhere)
    return case_dir / "run" / "output", "'run' is a symbolic link (to "


@pytest.mark.parametrize(
    "link", [_output_linked_outside, _output_linked_inside, _folder_above_output_linked]
)
def test_results_reached_through_a_link_are_refused(each_transport, tmp_path, link):
    case_dir, elsewhere = make_remote_case(tmp_path)
    remote_dir, expected = link(case_dir, elsewhere)
    on_host = snapshot(tmp_path / "host"), snapshot(elsewhere)
    dest = tmp_path / "results" / "case"

    with pytest.raises(ResultsRefused) as refused:
        download_results(
            each_transport, str(remote_dir), dest, timeout=TIMEOUT, case_dir=str(case_dir)
        )

    assert str(refused.value).startswith("results refused: " + expected), refused.value
    assert not dest.exists() and leftovers(dest.parent) == []
    assert (snapshot(tmp_path / "host"), snapshot(elsewhere)) == on_host


def test_a_results_folder_that_is_a_link_is_refused_without_a_case_folder(each_transport, tmp_path):
    case_dir, elsewhere = make_remote_case(tmp_path)
    (case_dir / "output").symlink_to(elsewhere / "output")

    with pytest.raises(ResultsRefused, match="is a symbolic link"):
        download_results(each_transport, str(case_dir / "output"), tmp_path / "back", timeout=TIMEOUT)

    assert not (tmp_path / "back").exists()


def _link_to_root(output: Path) -> str:
    (output / "root").symlink_to("/")
    return "'output/root' is a symbolic link to an absolute path ('/')"


def _link_to_the_input(output: Path) -> str:
    (output / "plan.dcm").symlink_to("../input/plan.dcm")  # inside the case, not the results
    return "'output/plan.dcm' is a symbolic link leaving the folder ('../input/plan.dcm')"


def _chain_climbing_out(output: Path) -> str:
    (output / "beam" / "top").symlink_to("..")  # the results folder itself: fine
    (output / "upper").symlink_to("beam/top/..")  # reads as `.`, goes to the case folder
    return "'output/upper' is a symbolic link leaving the folder ('beam/top/..')"


def _pipe_in_results(output: Path) -> str:
    os.mkfifo(output / "beam" / "pipe")
    return "'output/beam/pipe' is a named pipe (FIFO), not a file"


@pytest.mark.parametrize(
    "spoil", [_link_to_root, _link_to_the_input, _chain_climbing_out, _pipe_in_results]
)
def test_results_holding_a_link_out_of_them_or_a_special_file_are_refused(
    each_transport, tmp_path, spoil
):
    case_dir, _ = make_remote_case(tmp_path)
    output = case_dir / "output"
    (output / "beam").mkdir(parents=True)
    (output / "beam" / "dose.dcm").write_bytes(os.urandom(100_000))
    expected = spoil(output)
    on_host = snapshot(case_dir)
    dest = tmp_path / "results" / "case"

    with pytest.raises(ResultsRefused) as refused:
        download_results(each_transport, str(output), dest, timeout=TIMEOUT, case_dir=str(case_dir))

    assert str(refused.value) == "results refused: " + expected
    assert not dest.exists() and leftovers(dest.parent) == []
    assert snapshot(case_dir) == on_host


def test_links_that_stay_inside_the_results_are_carried_as_links(each_transport, tmp_path):
    case_dir, _ = make_remote_case(tmp_path)
    output = case_dir / "output"
    (output / "run 2" / "beam").mkdir(parents=True)
    (output / "run 2" / "dose.dcm").write_bytes(os.urandom(1000))
    (output / "latest").symlink_to("run 2")
    (output / "newest dose").symlink_to("latest/dose.dcm")  # through another link
    (output / "run 2" / "beam" / "results").symlink_to("../..")  # the results folder itself
    (output / "run 2" / "beam" / "dose.dcm").symlink_to("../dose.dcm")
    dest = tmp_path / "results" / "case"

    got = download_results(each_transport, str(output), dest, timeout=TIMEOUT, case_dir=str(case_dir))

    assert snapshot(dest) == snapshot(output)
    assert (dest / "newest dose").read_bytes() == (output / "run 2" / "dose.dcm").read_bytes()
    assert [e.path for e in got.entries if e.type == "symlink"] == [
        "latest", "newest dose", "run 2/beam/dose.dcm", "run 2/beam/results"
    ]


def test_a_stream_with_a_link_out_of_the_folder_is_not_put_in_place(tmp_path):
    """The receiver does not rely on the sender's check: its own copy is checked too."""
    from mqi import transfer_remote as wire

    source = tmp_path / "source"
    (source / "a").mkdir(parents=True)
    (source / "a" / "top").symlink_to("..")
    (source / "upper").symlink_to("a/top/..")
    # entries made by hand: scan() would refuse `upper` before anything is sent
    entries = [
        wire.Entry("a", wire.DIR, os.lstat(source / "a")),
        wire.Entry("a/top", wire.SYMLINK, os.lstat(source / "a" / "top"), ".."),
        wire.Entry("upper", wire.SYMLINK, os.lstat(source / "upper"), "a/top/.."),
    ]
    stream = io.BytesIO()
    wire.send_tree(str(source), entries, stream)
    staged = tmp_path / "staged"
    staged.mkdir()

    with pytest.raises(wire.StreamError, match="leaves the folder: 'upper' -> 'a/top/..'"):
        wire.receive_tree(io.BytesIO(stream.getvalue()), str(staged))


def test_connection_cut_during_download(sshd_factory, tmp_path):
    server = sshd_factory()
    transport = SshTransport(**server.transport_params(), connect_attempts=1)
    results = tmp_path / "output"
    results.mkdir()
    (results / "dose.bin").write_bytes(os.urandom(40 * 1024 * 1024))
    dest = tmp_path / "results"

    def cut_on_first_read(stream):
        server.kill_sessions()
        return stream

    with pytest.raises(HostUnreachable, match="connection lost"):
        download_results(
            Tapped(transport, on_read=cut_on_first_read), str(results), dest, timeout=TIMEOUT
        )

    assert not dest.exists() and leftovers(tmp_path) == []


def test_remove_remote_dir(each_transport, tmp_path):
    case = make_case(tmp_path)

    remove_remote_dir(each_transport, str(case), timeout=TIMEOUT)
    remove_remote_dir(each_transport, str(case), timeout=TIMEOUT)  # already gone: fine

    assert not case.exists()
    with pytest.raises(ValueError):
        remove_remote_dir(each_transport, "/", timeout=TIMEOUT)


@pytest.mark.parametrize("command", ["receive", "send"])
def test_the_remote_end_widens_its_pipe_to_a_megabyte(tmp_path, command):
    """Both ends of an SSH exec channel's pipe wake once per 1 MB, not per 64 KB."""
    import fcntl

    from mqi import transfer_remote
    from mqi.transfer import REMOTE_PROGRAM

    folder = tmp_path / "case"
    folder.mkdir()
    (folder / "big.bin").write_bytes(os.urandom(4 * 1024 * 1024))  # the sender blocks on the full pipe
    stdio = {"stdin": subprocess.PIPE} if command == "receive" else {"stdout": subprocess.PIPE}
    process = subprocess.Popen([sys.executable, "-I", "-c", REMOTE_PROGRAM, command, str(folder)], **stdio)
    ours = process.stdin if command == "receive" else process.stdout
    try:
        deadline = time.monotonic() + 20
        while fcntl.fcntl(ours.fileno(), 1032) != transfer_remote.PIPE_BYTES:  # F_GETPIPE_SZ
            assert time.monotonic() < deadline, "the pipe kept its 64 KB"
            time.sleep(0.02)
    finally:
        process.kill()
        process.wait()
