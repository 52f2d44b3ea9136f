"""Move a case folder to a host, and its results back, each as one verified stream.

A folder travels as a single tar stream over one command (`python3 -c <receiver>` on the
host, see `mqi.transfer_remote`), not file by file: one exec channel carries 2,000 small
files in about a second where SFTP needs minutes. The sender hashes each file as it reads
it; the receiver hashes what it writes, compares with the manifest at the end of the
stream, and only then renames the folder into place. So a folder that is in place is always
complete, and an interrupted transfer leaves nothing that looks finished.

Only the Transport interface is used, so transfers work the same to this machine and over
SSH. File names never reach a command line; they travel only inside the stream.
"""

from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from mqi import transfer_remote as wire
from mqi.errors import MqiError
from mqi.transport._common import Deadline
from mqi.transport.base import CommandResult, Transport, TransportError

REMOTE_PROGRAM = Path(wire.__file__).read_text()
DEFAULT_PYTHON = "python3"


class TransferError(MqiError):
    """A transfer could not be completed; `transient` says whether a retry may help."""

    transient = False


class CaseInputError(TransferError):
    """The case folder holds something that cannot be sent; the message names it."""


class TransferVerificationFailed(TransportError, TransferError):
    """What arrived differs from what was sent (damaged or cut short in transit): a
    transport problem, so whoever retries those retries this too."""

    transient = True


class RemoteResultsMissing(TransferError):
    """The folder to download does not exist on the host."""


class ResultsRefused(TransferError):
    """The results hold something that is not carried (a symbolic link out of them, a named
    pipe or device, an unreadable file), or are no real folder inside the case; the message
    names it. Nothing was put in place and the host's files are as they were."""


@dataclass(frozen=True)
class ManifestEntry:
    path: str  # relative, "/"-separated; undecodable bytes kept as surrogate escapes
    type: str  # "file", "dir" or "symlink"
    mode: int  # permission bits
    size: int
    sha256: str  # files only
    target: str  # symbolic links only


@dataclass(frozen=True)
class Manifest:
    """What a folder holds, as verified at both ends of a transfer."""

    entries: tuple[ManifestEntry, ...]
    #: True when the upload was skipped because the host already held exactly this
    reused: bool = field(default=False, compare=False)

    @classmethod
    def from_records(cls, records: list[dict], *, reused: bool = False) -> Manifest:
        return cls(tuple(ManifestEntry(**record) for record in records), reused=reused)

    @property
    def file_count(self) -> int:
        return sum(entry.type == wire.FILE for entry in self.entries)

    @property
    def total_bytes(self) -> int:
        return sum(entry.size for entry in self.entries)


def upload_case(
    transport: Transport,
    local_dir: Path,
    remote_dir: str,
    *,
    timeout: float,
    python: str = DEFAULT_PYTHON,
    may_be_there: bool = True,
) -> Manifest:
    """Put a copy of `local_dir` at `remote_dir` on the host and return its manifest.

    If the host already holds exactly this folder (an earlier upload that completed), no
    data is sent. A partial or different folder there is replaced. `python` is the
    interpreter on the host. `may_be_there=False` (a first upload to a new folder) skips
    looking, a remote command less."""
    deadline = Deadline(timeout)
    local_dir = Path(local_dir)
    entries = _scan_case(local_dir)
    outcome: dict[str, list[dict]] = {}

    def write(stream) -> None:
        reusable = _reusable(local_dir, entries, asked.result() if asked else None)
        if reusable is not None:
            outcome["reused"] = reusable  # send nothing: the receiver leaves the host as is
        else:
            outcome["sent"] = wire.send_tree(str(local_dir), entries, stream)

    # What the host already holds is asked while the receiver starts: each remote command
    # costs a shell start, and this way the upload waits for one, not two.
    with ThreadPoolExecutor(max_workers=1) as background:
        asked = background.submit(_remote_manifest, transport, remote_dir, deadline, python) if may_be_there else None
        result = _case_call(
            local_dir,
            transport.run_writing,
            _remote_command(python, "receive", remote_dir),
            write,
            timeout=deadline.remaining(),
        )
    arrived = _reply(result, remote_dir)
    if "reused" in outcome:
        return Manifest.from_records(outcome["reused"], reused=True)
    if arrived != outcome["sent"]:
        raise TransferVerificationFailed(
            transport.host, f"the manifest of {remote_dir!r} differs from the one sent"
        )
    return Manifest.from_records(outcome["sent"])


def download_results(
    transport: Transport,
    remote_dir: str,
    local_dest: Path,
    *,
    timeout: float,
    python: str = DEFAULT_PYTHON,
    case_dir: str | None = None,
) -> Manifest:
    """Copy `remote_dir` from the host to `local_dest` and return its manifest.

    The copy is made in a hidden sibling of `local_dest` and renamed into place only once
    verified; an existing `local_dest` is replaced only then.

    Nothing is read through a symbolic link: `remote_dir`, and every folder from `case_dir`
    (default: `remote_dir` itself) down to it, must be real folders, and links inside are
    carried only under the rule in `mqi.transfer_remote`; anything else raises ResultsRefused
    and leaves the host's files as they are."""
    local_dest = Path(local_dest)
    staged = wire.staging_folder(str(local_dest))
    try:
        outcome, result = transport.run_reading(
            _remote_command(python, "send", remote_dir, *([case_dir] if case_dir else [])),
            lambda stream: _receive(stream, staged),
            timeout=timeout,
        )
        if result.exit_code == wire.EXIT_MISSING:
            raise RemoteResultsMissing(
                f"host {transport.host!r}: no results folder {remote_dir!r}"
            )
        if result.exit_code == wire.EXIT_REFUSED:
            raise ResultsRefused(f"results refused: {_last_line(result.err)}")
        _check(result, remote_dir)
        if isinstance(outcome, wire.StreamError):
            raise TransferVerificationFailed(
                transport.host, f"download of {remote_dir!r} failed: {outcome}"
            )
        wire.put_in_place(staged, str(local_dest))
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    return Manifest.from_records(outcome)


def remove_remote_dir(
    transport: Transport, remote_dir: str, *, timeout: float = 300, python: str = DEFAULT_PYTHON
) -> None:
    """Delete `remote_dir` on the host (after a verified download); a missing one is fine."""
    if remote_dir.strip().rstrip("/") in ("", ".", "..", "~"):
        raise ValueError(f"refusing to remove {remote_dir!r}")
    result = transport.run(_remote_command(python, "remove", remote_dir), timeout=timeout)
    _check(result, remote_dir)


# -- helpers -----------------------------------------------------------------------------


def _remote_command(python: str, command: str, *folders: str) -> list[str]:
    return [python, "-I", "-c", REMOTE_PROGRAM, command, *folders]


def _last_line(text: str) -> str:
    """The remote end's own message: a login script may have printed before it."""
    lines = text.strip().splitlines()
    return lines[-1] if lines else "no reason given"


def _scan_case(local_dir: Path) -> list[wire.Entry]:
    if not local_dir.is_dir():
        raise CaseInputError(f"case folder {str(local_dir)!r} does not exist or is not a folder")
    return _case_call(local_dir, wire.scan, str(local_dir))


def _case_call(local_dir: Path, function, *args, **kwargs):
    """Call `function`, reporting anything it refuses as a problem of the case folder."""
    try:
        return function(*args, **kwargs)
    except wire.RefusedEntry as refused:
        raise CaseInputError(
            f"case folder {str(local_dir)!r}: {refused.path!r} {refused.reason}"
        ) from None


def _remote_manifest(
    transport: Transport, remote_dir: str, deadline: Deadline, python: str
) -> list[dict] | None:
    result = transport.run(
        _remote_command(python, "manifest", remote_dir), timeout=deadline.remaining()
    )
    if result.exit_code == wire.EXIT_REFUSED:
        return None  # something there we would not send ourselves: it gets replaced
    return _reply(result, remote_dir)


def _reusable(
    local_dir: Path, entries: list[wire.Entry], existing: list[dict] | None
) -> list[dict] | None:
    """The local manifest if the host already holds exactly this folder, else None.

    Files are hashed only when paths, types, sizes and modes already agree."""
    if existing is None:
        return None
    if [dict(record, sha256="") for record in existing] != [entry.record() for entry in entries]:
        return None
    local = _case_call(local_dir, wire.manifest_of, str(local_dir), entries)
    return local if local == existing else None


def _receive(stream, staged: str) -> list[dict] | wire.StreamError:
    try:
        return wire.receive_tree(stream, staged)
    except wire.StreamError as error:
        return error


def _reply(result: CommandResult, remote_dir: str) -> list[dict] | None:
    """The manifest a remote command printed on its last line, after checking how it
    exited (a login script may print before it)."""
    _check(result, remote_dir)
    last_line = result.stdout.rstrip(b"\n").rpartition(b"\n")[2]
    try:
        return json.loads(last_line)["manifest"]
    except (ValueError, KeyError, TypeError):
        raise TransferError(
            f"host {result.host!r}: unexpected reply about {remote_dir!r}: {result.out[-300:]!r}"
        ) from None


def _check(result: CommandResult, remote_dir: str) -> None:
    if result.exit_code == wire.EXIT_BAD_STREAM:
        raise TransferVerificationFailed(
            result.host, f"transfer to {remote_dir!r} failed verification: {result.err.strip()}"
        )
    if result.exit_code == wire.EXIT_REFUSED:
        raise TransferError(f"host {result.host!r}: {remote_dir!r}: {result.err.strip()}")
    result.check()
