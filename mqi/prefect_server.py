"""Which Prefect API a command talks to, and the embedded Prefect server of `mqi run`.

Three cases, decided by the settings:
- `prefect.api_url` is set: every command uses that server.
- `mqi run` without it starts an embedded server (`prefect server start` as a child process)
  whose home, SQLite database and log live in `state_dir`, so flow runs and blocks persist
  between runs. While it runs, a record in `state_dir` lets other commands find it.
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
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from mqi.errors import MqiError
from mqi.settings import Settings

LOOPBACK = "127.0.0.1"
PREFERRED_PORT = 4200
SERVER_RECORD = "server.json"
SERVER_LOG = "prefect-server.log"
LOG_LINES_IN_ERRORS = 20
STARTUP_TIMEOUT = 90  # seconds; a first start migrates the database, and hosts may be busy


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
def use_prefect(settings: Settings, *, embedded_server: bool = False) -> Iterator[str | None]:
    """Point Prefect in this process at the API these settings call for; yield its URL.

    With `embedded_server` (for `mqi run`) and no configured `prefect.api_url`, start the
    embedded server for the duration. Otherwise the URL is the configured or running server,
    or None for ephemeral mode. The previous environment is restored on exit.
    """
    if embedded_server and not settings.prefect.api_url:
        with EmbeddedPrefectServer.start(settings) as server:
            with _prefect_env(_prefect_env_for(settings, server.api_url)):
                yield server.api_url
    else:
        env = configure_prefect_env(settings)
        with _prefect_env(env):
            yield env["PREFECT_API_URL"] or None


def running_server_url(settings: Settings) -> str | None:
    """The API URL of this state_dir's embedded server if one is running and answers."""
    pid, api_url = _read_record(prefect_home(settings) / SERVER_RECORD)
    if pid and _process_alive(pid) and _healthy(api_url, timeout=2.0):
        return api_url
    return None


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
        cls, settings: Settings, *, port: int | None = None, startup_timeout: float = STARTUP_TIMEOUT
    ) -> EmbeddedPrefectServer:
        """Start the server and wait until it answers; port None = 4200 if free, else any free one.

        Raises MqiError when this state_dir's server already runs, or when the server exits or
        does not answer within `startup_timeout` seconds (the message names its log file).
        """
        home = prefect_home(settings)
        record_path = home / SERVER_RECORD
        if url := running_server_url(settings):
            pid, _ = _read_record(record_path)
            raise MqiError(
                f"a Prefect server for state_dir {str(settings.state_dir)!r} is already running "
                f"(pid {pid}, {url}); stop that `mqi run` or server process first, "
                "or set prefect.api_url to use it"
            )
        home.mkdir(parents=True, exist_ok=True)
        log_path = settings.state_dir.resolve() / SERVER_LOG
        port = port or _preferred_or_free_port()
        server = cls(_spawn(home, port, log_path), port, log_path, record_path)
        try:
            server._wait_until_healthy(startup_timeout)
        except BaseException:
            server.stop()
            raise
        record_path.write_text(json.dumps({"pid": server.process.pid, "api_url": server.api_url}))
        return server

    def stop(self, timeout: float = 15.0) -> None:
        """Stop the server (politely, then by force) and forget its record. Safe to call twice."""
        if self.process.poll() is None:
            _signal_group(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                _signal_group(self.process.pid, signal.SIGKILL)
                self.process.wait()
        if _read_record(self._record_path)[0] == self.process.pid:
            self._record_path.unlink(missing_ok=True)

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


def _spawn(home: Path, port: int, log_path: Path) -> subprocess.Popen:
    command = [
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
        with urllib.request.urlopen(f"{api_url}/admin/settings", timeout=5) as response:
            return Path(json.load(response).get("home", "")) == home
    except (OSError, ValueError):
        return False


def _healthy(api_url: str, *, timeout: float) -> bool:
    try:
        with _DIRECT.open(f"{api_url}/health", timeout=timeout) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _read_record(path: Path) -> tuple[int | None, str | None]:
    """The pid and API URL a running server recorded; (None, None) when there is no valid record."""
    try:
        record = json.loads(path.read_text())
        return int(record["pid"]), str(record["api_url"])
    except (OSError, ValueError, TypeError, KeyError):
        return None, None


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


def _log_tail(path: Path) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(lines[-LOG_LINES_IN_ERRORS:])
