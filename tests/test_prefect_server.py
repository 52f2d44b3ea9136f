"""The embedded Prefect server of `mqi run` and the Prefect environment of short commands.

These tests start real Prefect servers (several seconds each), never on the fixed port 4200.
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import subprocess
import sys
import textwrap
import urllib.request

import pytest

from mqi.errors import MqiError
from mqi.prefect_server import (
    EmbeddedPrefectServer,
    configure_prefect_env,
    prefect_home,
)
from mqi.settings import Settings

PROBE_VARIABLE = "mqi-probe"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def api_call(api_url: str, path: str, body: dict | None = None):
    request = urllib.request.Request(
        f"{api_url}{path}",
        data=None if body is None else json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read() or "null")


def process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def stored_variable(settings: Settings, name: str) -> str | None:
    """A Prefect variable read straight from the SQLite database in state_dir."""
    with sqlite3.connect(prefect_home(settings) / "prefect.db") as db:
        row = db.execute("SELECT value FROM variable WHERE name = ?", (name,)).fetchone()
    return json.loads(row[0]) if row else None


@pytest.fixture
def settings(tmp_path) -> Settings:
    return Settings(state_dir=tmp_path / "state")


def test_embedded_server_keeps_its_data_in_state_dir_across_a_restart(settings):
    server = EmbeddedPrefectServer.start(settings, port=free_port())
    try:
        assert api_call(server.api_url, "/health") is True
        assert server.ui_url == server.api_url.removesuffix("/api")
        # Other commands of this state_dir find the running server instead of starting one.
        assert configure_prefect_env(settings)["PREFECT_API_URL"] == server.api_url
        with pytest.raises(MqiError, match="already running"):
            EmbeddedPrefectServer.start(settings, port=free_port())
        api_call(server.api_url, "/variables/", {"name": PROBE_VARIABLE, "value": "kept"})
    finally:
        server.stop()

    assert server.process.returncode is not None and not process_exists(server.process.pid)
    assert configure_prefect_env(settings)["PREFECT_API_URL"] == ""  # no server recorded any more
    assert (prefect_home(settings) / "prefect.db").is_file()
    assert server.api_url in (settings.state_dir / "prefect-server.log").read_text()  # its banner

    with EmbeddedPrefectServer.start(settings, port=free_port()) as restarted:
        assert api_call(restarted.api_url, f"/variables/name/{PROBE_VARIABLE}")["value"] == "kept"
    assert not process_exists(restarted.process.pid)


def test_a_server_that_cannot_start_is_reported_with_its_log(settings):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]

        with pytest.raises(MqiError) as caught:
            EmbeddedPrefectServer.start(settings, port=port)

    message = str(caught.value)
    assert "exited" in message
    assert str(settings.state_dir.resolve() / "prefect-server.log") in message
    assert "already in use" in message  # the tail of the log says why


def test_configured_api_url_wins_over_everything(settings):
    configured = Settings(state_dir=settings.state_dir, prefect={"api_url": "http://10.1.2.3:4200/api"})

    env = configure_prefect_env(configured)

    assert env["PREFECT_API_URL"] == "http://10.1.2.3:4200/api"
    assert env["PREFECT_SERVER_EPHEMERAL_ENABLED"] == "false"
    assert env["PREFECT_HOME"] == str(settings.state_dir.resolve() / "prefect")


def run_python(code: str, **env: str) -> None:
    """Run `code` in a fresh process, as a CLI command would run, outside any Prefect settings."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=clean | env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_use_prefect_applies_and_restores_settings_even_with_prefect_imported(settings):
    run_python(
        f"""
        import os
        import prefect.settings  # imported early, as a CLI module might
        from mqi.settings import Settings
        from mqi.prefect_server import use_prefect

        url = "http://127.0.0.1:9/api"
        with use_prefect(Settings(state_dir={str(settings.state_dir)!r}, prefect={{"api_url": url}})):
            current = prefect.settings.get_current_settings()
            assert current.api.url == url, current.api.url
            assert str(current.home) == {str(prefect_home(settings))!r}, current.home
        assert prefect.settings.get_current_settings().api.url == "http://outside.example/api"
        assert os.environ["PREFECT_API_URL"] == "http://outside.example/api"
        assert "PREFECT_HOME" not in os.environ
        """,
        PREFECT_API_URL="http://outside.example/api",
    )


def test_short_command_uses_ephemeral_mode_with_its_database_in_state_dir(settings):
    run_python(
        f"""
        import sys
        from mqi.settings import Settings
        from mqi.prefect_server import use_prefect

        with use_prefect(Settings(state_dir={str(settings.state_dir)!r})) as api_url:
            assert api_url is None
            from prefect.variables import Variable  # prefect first imported here
            Variable.set({PROBE_VARIABLE!r}, "from a short command")
        """
    )

    assert stored_variable(settings, PROBE_VARIABLE) == "from a short command"
