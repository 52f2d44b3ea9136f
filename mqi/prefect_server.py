"""Which Prefect API a command talks to, and the embedded Prefect server of `mqi run`.

Three cases, decided by the settings:
- `prefect.api_url` is set: every command uses that server.
- `mqi run` without it starts an embedded server (`prefect server start` as a child process)
  whose home, SQLite database and log live in `state_dir`, so flow runs and blocks persist
  between runs. While it runs, a record in `state_dir` lets other commands find it.
  The server ends with its `mqi run`, however that ends: on Linux the kernel kills it when
  `mqi run` dies (a parent-death signal, see `mqi.die_with_parent`). The record also names
  the `mqi run` that owns the server, so a server left behind all the same (another OS, an
  older version of mqi) is recognised by the next start and replaced.
- Short commands (`mqi demo`, `mqi submit`) without a configured or running server use
  Prefect's ephemeral mode: Prefect starts a temporary server (a child process) on the same
  database in `state_dir` and stops it when the command ends.

Prefect reads its settings from the environment when it is first imported. Callers therefore
either enter `use_prefect(...)` before importing anything that imports prefect (flows, tasks,
blocks), or apply `configure_prefect_env(...)` to the environment of a fresh process.
`use_prefect` also refreshes Prefect's settings when prefect is already imported, which covers
module-level use but not a settings context someone has entered (such as a test harness).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from mqi.errors import MqiError
from mqi.settings import Settings

_log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
PREFERRED_PORT = 4200
SERVER_RECORD = "server.json"
SERVER_LOG = "prefect-server.log"
LOG_LINES_IN_ERRORS = 20
STARTUP_TIMEOUT = 90  # seconds; a first start migrates the database, and hosts may be busy
STOP_TIMEOUT = 15.0  # seconds a server has to stop after SIGTERM before it is killed
INIT_PID = 1
PROC = Path("/proc")


def prefect_home(settings: Settings) -> Path:
    """PREFECT_HOME for these settings: Prefect's profiles, local storage and SQLite database."""
    return (settings.state_dir / "prefect").resolve()


def configure_prefect_env(settings: Settings) -> dict[str, str]:
    """The Prefect environment variables for a command run with these settings.

    PREFECT_API_URL is the configured server, else the running embedded server of this
    state_dir, else empty with ephemeral mode enabled. The settings decide: a PREFECT_API_URL
    already in the environment is replaced. Creates PREFECT_HOME (Prefect only creates its last
    component, and without it an ephemeral server cannot open its database).
    """
    prefect_home(settings).mkdir(parents=True, exist_ok=True)
    return _prefect_env_for(settings, settings.prefect.api_url or running_server_url(settings) or "")


def _prefect_env_for(settings: Settings, api_url: str) -> dict[str, str]:
    return {
        "PREFECT_HOME": str(prefect_home(settings)),
        "PREFECT_API_URL": api_url,
        "PREFECT_SERVER_EPHEMERAL_ENABLED": "false" if api_url else "true",
        # Prefect's own 20 s is too short for a first start on a busy 2-CPU host.
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": str(STARTUP_TIMEOUT),
        # No usage reports from a clinical network (and no errors logged where it has no internet).
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }


@contextmanager
def use_prefect(
    settings: Settings, *, embedded_server: bool = False, notify: Callable[[str], None] | None = None
) -> Iterator[str | None]:
    """Point Prefect in this process at the API these settings call for; yield its URL.

    With `embedded_server` (for `mqi run`) and no configured `prefect.api_url`, start the
    embedded server for the duration (`notify` is told when it replaces one left behind).
    Otherwise the URL is the configured or running server, or None for ephemeral mode. The
    previous environment is restored on exit.
    """
    if embedded_server and not settings.prefect.api_url:
        with EmbeddedPrefectServer.start(settings, notify=notify) as server:
            with _prefect_env(_prefect_env_for(settings, server.api_url)):
                yield server.api_url
    else:
        env = configure_prefect_env(settings)
        with _prefect_env(env):
            yield env["PREFECT_API_URL"] or None


def running_server_url(settings: Settings) -> str | None:
    """The API URL of this state_dir's embedded server if one is running and answers."""
    record = ServerRecord.read(prefect_home(settings) / SERVER_RECORD)
    if record and record.server.is_running() and _healthy(record.api_url, timeout=2.0):
        return record.api_url
    return None


@dataclass(frozen=True)
class ProcessIdentity:
    """A process, told apart from a later one that is given the same pid by its start time."""

    pid: int
    started: int | None  # clock ticks after boot (/proc/PID/stat); None when unknown

    @classmethod
    def of(cls, pid: int) -> ProcessIdentity | None:
        """The process `pid` now, or None when there is none (or only a zombie)."""
        if not PROC.is_dir():  # not Linux: no start time to tell a reused pid apart
            return cls(pid, None) if _process_alive(pid) else None
        stat = _proc_stat(pid)
        return None if stat is None else cls(pid, stat.started)

    def is_running(self) -> bool:
        now = ProcessIdentity.of(self.pid)
        return now is not None and (self.started is None or now.started == self.started)

    def to_json(self) -> dict:
        return {"pid": self.pid, "started": self.started}

    @classmethod
    def from_json(cls, data: dict) -> ProcessIdentity:
        started = data.get("started")
        return cls(int(data["pid"]), None if started is None else int(started))


@dataclass(frozen=True)
class ServerRecord:
    """`state_dir/prefect/server.json`: the embedded server's process, its URL and its owner."""

    server: ProcessIdentity
    api_url: str
    owner: ProcessIdentity | None  # the `mqi run` that started it; None in older versions' records

    @classmethod
    def read(cls, path: Path) -> ServerRecord | None:
        """The record at `path`; None when there is none or it cannot be read."""
        try:
            data = json.loads(path.read_text())
            owner = data.get("owner")
            return cls(
                ProcessIdentity.from_json(data),
                str(data["api_url"]),
                None if owner is None else ProcessIdentity.from_json(owner),
            )
        except (OSError, ValueError, TypeError, KeyError, AttributeError):
            return None

    def write(self, path: Path) -> None:
        """Replace the record at `path` whole: a reader never sees half of one."""
        data = {**self.server.to_json(), "api_url": self.api_url,
                "owner": None if self.owner is None else self.owner.to_json()}
        partial = path.with_name(f".{path.name}.{os.getpid()}")
        partial.write_text(json.dumps(data))
        partial.replace(path)


class EmbeddedPrefectServer:
    """A `prefect server start` child process on loopback. Use `start()`, then `stop()` or `with`."""

    def __init__(self, process: subprocess.Popen, port: int, log_path: Path, record_path: Path):
        self.process = process
        self.port = port
        self.log_path = log_path
        self._record_path = record_path
        self._home = record_path.parent

    @property
    def ui_url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def api_url(self) -> str:
        return f"{self.ui_url}/api"

    @classmethod
    def start(
        cls,
        settings: Settings,
        *,
        port: int | None = None,
        startup_timeout: float = STARTUP_TIMEOUT,
        notify: Callable[[str], None] | None = None,
    ) -> EmbeddedPrefectServer:
        """Start the server and wait until it answers; port None = 4200 if free, else any free one.

        Start it from a thread that lives as long as the server should (the main thread): on
        Linux the server is killed when that thread ends. A server this state_dir's record
        names whose owner has ended is stopped first, and `notify` (default: a warning in the
        log) told so in one line.

        Raises MqiError when this state_dir's server already runs for a live owner, or when the
        server exits or does not answer within `startup_timeout` seconds (the message names
        its log file).
        """
        home = prefect_home(settings)
        record_path = home / SERVER_RECORD
        if previous := ServerRecord.read(record_path):
            _take_over_from(previous, settings, notify or _log.warning)
        home.mkdir(parents=True, exist_ok=True)
        log_path = settings.state_dir.resolve() / SERVER_LOG
        port = port or _preferred_or_free_port()
        server = cls(_spawn(home, port, log_path), port, log_path, record_path)
        try:
            # Recorded at once: should this process die during the start, the next one knows.
            server._record().write(record_path)
            server._wait_until_healthy(startup_timeout)
        except BaseException:
            server.stop()
            raise
        return server

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """Stop the server (politely, then by force) and forget its record. Safe to call twice."""
        _end_process_group(self.process.pid, lambda: self.process.poll() is not None, timeout)
        recorded = ServerRecord.read(self._record_path)
        if recorded and recorded.server.pid == self.process.pid:
            self._record_path.unlink(missing_ok=True)

    def _record(self) -> ServerRecord:
        server = ProcessIdentity.of(self.process.pid) or ProcessIdentity(self.process.pid, None)
        return ServerRecord(server, self.api_url, ProcessIdentity.of(os.getpid()))

    def __enter__(self) -> EmbeddedPrefectServer:
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def _wait_until_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        # Another server may answer on the same port (a race for 4200): only ours will do.
        while not (_healthy(self.api_url, timeout=2.0) and _serves_home(self.api_url, self._home)):
            if self.process.poll() is not None:
                raise MqiError(
                    f"the embedded Prefect server exited with code {self.process.returncode} "
                    f"during start; see {self.log_path}:\n{_log_tail(self.log_path)}"
                )
            if time.monotonic() > deadline:
                raise MqiError(
                    f"the embedded Prefect server did not answer at {self.api_url}/health within "
                    f"{timeout:.0f} s; see {self.log_path}:\n{_log_tail(self.log_path)}"
                )
            time.sleep(0.25)


def _take_over_from(previous: ServerRecord, settings: Settings, notify: Callable[[str], None]) -> None:
    """Refuse to start while the recorded server of this state_dir runs for a live owner;
    stop it when its owner has ended. A record of a server that has ended is just replaced."""
    if not _recorded_server_runs(previous, settings):
        return
    owner = previous.owner or _owner_of_unowned(previous.server.pid)
    if owner is not None and owner.is_running():
        raise MqiError(
            f"a Prefect server for state_dir {str(settings.state_dir)!r} is already running "
            f"(pid {previous.server.pid}, {previous.api_url}), started by `mqi run` pid {owner.pid}, "
            "which is still running; stop that `mqi run` first, or set prefect.api_url to use its server"
        )
    gone = f"its `mqi run` (pid {owner.pid}) has ended" if owner else "it was left running by an ended `mqi run`"
    notify(
        f"stopping the Prefect server of state_dir {str(settings.state_dir)!r} (pid "
        f"{previous.server.pid}, {previous.api_url}): {gone}; starting a new one"
    )
    _end_process_group(previous.server.pid, lambda: not previous.server.is_running(), STOP_TIMEOUT)
    if previous.server.is_running():
        raise MqiError(f"the Prefect server pid {previous.server.pid} left behind by an ended `mqi run` did not stop")


def _recorded_server_runs(record: ServerRecord, settings: Settings) -> bool:
    """True when the server the record names still runs.

    Older records lack the start time that tells a reused pid apart: for them the process must
    also answer at the recorded URL as this state_dir's server.
    """
    if not record.server.is_running():
        return False
    if record.server.started is not None:
        return True
    return _healthy(record.api_url, timeout=2.0) and _serves_home(record.api_url, prefect_home(settings))


def _owner_of_unowned(server_pid: int) -> ProcessIdentity | None:
    """The owner of a server recorded without one (by an older mqi): its parent, the `mqi run`
    that started it, unless init has adopted it because that parent died."""
    stat = _proc_stat(server_pid)
    if stat is None or stat.parent == INIT_PID:
        return None
    return ProcessIdentity.of(stat.parent)


def _spawn(home: Path, port: int, log_path: Path) -> subprocess.Popen:
    command = [
        # Killed by the kernel when this process dies (Linux). `prefect server start` serves the
        # API with uvicorn in this very process (one worker, Prefect 3.9), so that ends the
        # server whole; SIGKILL because it cannot be caught, so an unanswered shutdown cannot
        # keep it running. Should Prefect ever start children, they share its process group,
        # which the next start stops (see `_take_over_from`).
        sys.executable, "-m", "mqi.die_with_parent", str(os.getpid()),
        sys.executable, "-m", "prefect", "server", "start",
        "--host", LOOPBACK, "--port", str(port), "--analytics-off",
    ]
    env = {**os.environ, "PREFECT_HOME": str(home)}
    with open(log_path, "ab") as log:
        # Its own session: Ctrl-C in a terminal reaches mqi, which then stops the server last,
        # after the flows it serves have finished.
        return subprocess.Popen(
            command, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _end_process_group(leader: int, has_ended: Callable[[], bool], timeout: float) -> None:
    """SIGTERM the process group `leader` leads (start_new_session); SIGKILL it when the leader
    has not ended within `timeout` seconds. Returns when the leader has ended, or `timeout`
    seconds after the SIGKILL at the latest."""
    for signum, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, timeout)):
        if has_ended():
            return
        _signal_group(leader, signum)
        deadline = time.monotonic() + wait
        while not has_ended() and time.monotonic() < deadline:
            time.sleep(0.1)


@contextmanager
def _prefect_env(env: dict[str, str]) -> Iterator[None]:
    previous = {name: os.environ.get(name) for name in env}
    apply_prefect_env(env)
    try:
        yield
    finally:
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        _refresh_prefect_settings()


def apply_prefect_env(env: dict[str, str]) -> None:
    """Put `env` into this process's environment; an empty value removes the variable.

    An empty PREFECT_API_URL is not the same as none: Prefect then starts its event worker
    against no server, and every event of the run fails to send.
    """
    for name, value in env.items():
        if value:
            os.environ[name] = value
        else:
            os.environ.pop(name, None)
    _refresh_prefect_settings()


def _refresh_prefect_settings() -> None:
    # Prefect builds its settings from the environment at import; refresh them if it is loaded.
    if "prefect.context" in sys.modules:
        sys.modules["prefect.context"].refresh_global_settings_context()


def _preferred_or_free_port() -> int:
    for candidate in (PREFERRED_PORT, 0):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((LOOPBACK, candidate))
            except OSError:
                continue
            return sock.getsockname()[1]
    raise MqiError(f"no free TCP port on {LOOPBACK} for the embedded Prefect server")


# The server is on loopback: an HTTP proxy from the environment must not be asked for it.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _serves_home(api_url: str, home: Path) -> bool:
    """True when the server at `api_url` is the one whose PREFECT_HOME is `home`."""
    try:
        with _DIRECT.open(f"{api_url}/admin/settings", timeout=5) as response:
            return Path(json.load(response).get("home", "")) == home
    except (OSError, ValueError):
        return False


def _healthy(api_url: str, *, timeout: float) -> bool:
    try:
        with _DIRECT.open(f"{api_url}/health", timeout=timeout) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


@dataclass(frozen=True)
class _ProcStat:
    parent: int
    started: int  # clock ticks after boot


def _proc_stat(pid: int) -> _ProcStat | None:
    """Parent and start time of a live process from /proc; None when it is gone or a zombie."""
    try:
        text = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    # The command name (2nd field) may hold spaces and parentheses: the rest follows the last ")".
    fields = text[text.rindex(")") + 2 :].split()
    if fields[0] in ("Z", "X"):  # dead, only not yet reaped by its parent
        return None
    return _ProcStat(parent=int(fields[1]), started=int(fields[19]))


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, it is someone else's
    return True


def _signal_group(pid: int, signum: int) -> None:
    try:
        os.killpg(pid, signum)  # the server leads its own process group (start_new_session)
    except ProcessLookupError:
        pass
    except PermissionError:
        raise MqiError(f"not allowed to stop the Prefect server pid {pid}: it is another user's") from None


def _log_tail(path: Path) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(lines[-LOG_LINES_IN_ERRORS:])
