"""The embedded Prefect server of `mqi run` and the Prefect environment of short commands.

These tests start real Prefect servers (several seconds each), never on the fixed port 4200,
except the `mqi run` test, which lets `mqi run` choose its port as it does in production.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import textwrap
import urllib.request
from pathlib import Path

import pytest

from mqi.die_with_parent import PARENT_GONE
from mqi.errors import MqiError
from mqi.prefect_server import (
    SERVER_RECORD,
    EmbeddedPrefectServer,
    ProcessIdentity,
    configure_prefect_env,
    prefect_home,
)
from mqi.settings import Settings
from tests.support.cases import wait_for
from tests.test_main_job import MQI, write_config

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


def process_group(pgid: int) -> list[int]:
    """The live (not zombie) processes of process group `pgid`, read from /proc."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # ended while we looked
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            members.append(int(stat.parent.name))
    return members


def ended_process() -> ProcessIdentity:
    """The identity of a process that has run and ended (and been reaped)."""
    sleeper = subprocess.Popen(["sleep", "60"])
    identity = ProcessIdentity.of(sleeper.pid)
    sleeper.kill()
    sleeper.wait()
    return identity


def record_of(settings: Settings) -> dict:
    return json.loads((prefect_home(settings) / SERVER_RECORD).read_text())


def test_embedded_server_refuses_a_live_owner_replaces_an_ended_ones_and_keeps_its_data(settings):
    notes = []
    server = EmbeddedPrefectServer.start(settings, port=free_port(), notify=notes.append)
    replaced = None
    try:
        assert api_call(server.api_url, "/health") is True
        assert server.ui_url == server.api_url.removesuffix("/api")
        # Other commands of this state_dir find the running server instead of starting one.
        assert configure_prefect_env(settings)["PREFECT_API_URL"] == server.api_url
        assert record_of(settings)["owner"]["pid"] == os.getpid()

        # Its owner (this process) lives: refused, naming the server and its owner.
        with pytest.raises(MqiError, match="already running") as refused:
            EmbeddedPrefectServer.start(settings, port=free_port(), notify=notes.append)
        assert f"pid {server.process.pid}," in str(refused.value)
        assert f"`mqi run` pid {os.getpid()}, which is still running" in str(refused.value)

        # An older mqi's record names no owner: the server's parent (this process) is taken.
        record_path = prefect_home(settings) / SERVER_RECORD
        current_record = record_path.read_text()
        record_path.write_text(json.dumps({"pid": server.process.pid, "api_url": server.api_url}))
        with pytest.raises(MqiError, match=f"`mqi run` pid {os.getpid()}, which is still running"):
            EmbeddedPrefectServer.start(settings, port=free_port(), notify=notes.append)
        assert notes == []
        api_call(server.api_url, "/variables/", {"name": PROBE_VARIABLE, "value": "kept"})

        # Its owner has ended (as after a kill -9, where the server did not die with it): replaced.
        record_path.write_text(json.dumps(json.loads(current_record) | {"owner": ended_process().to_json()}))
        replaced = EmbeddedPrefectServer.start(settings, port=free_port(), notify=notes.append)
        assert server.process.wait(5) is not None and process_group(server.process.pid) == []
        assert len(notes) == 1 and f"(pid {server.process.pid}, {server.api_url})" in notes[0]
        assert "has ended; starting a new one" in notes[0]
        assert api_call(replaced.api_url, f"/variables/name/{PROBE_VARIABLE}")["value"] == "kept"
        assert configure_prefect_env(settings)["PREFECT_API_URL"] == replaced.api_url
    finally:
        server.stop()
        if replaced:
            replaced.stop()

    assert replaced.process.returncode is not None and not process_exists(replaced.process.pid)
    assert configure_prefect_env(settings)["PREFECT_API_URL"] == ""  # no server recorded any more
    assert not (prefect_home(settings) / SERVER_RECORD).exists()
    assert (prefect_home(settings) / "prefect.db").is_file()
    assert replaced.api_url in (settings.state_dir / "prefect-server.log").read_text()  # its banner


def test_a_process_is_told_apart_from_a_later_one_with_the_same_pid():
    me = ProcessIdentity.of(os.getpid())
    assert me.is_running()
    assert not ProcessIdentity(me.pid, me.started + 1).is_running()  # the pid, reused later
    assert not ended_process().is_running()


def test_a_command_started_through_die_with_parent_ends_when_its_parent_is_killed(tmp_path):
    parent = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent("""
            import os, subprocess, sys, time
            child = subprocess.Popen([sys.executable, "-m", "mqi.die_with_parent", str(os.getpid()),
                                      "sleep", "120"], start_new_session=True)
            print(child.pid, flush=True)
            time.sleep(120)
        """)],
        stdout=subprocess.PIPE, text=True,
    )
    child = int(parent.stdout.readline())
    try:
        wait_for(lambda: Path(f"/proc/{child}/cmdline").read_bytes().startswith(b"sleep"), what="the exec")
        parent.kill()
        parent.wait()
        wait_for(lambda: process_group(child) == [], timeout=10, what="the child to die with its parent")
    finally:
        parent.kill()
        if process_exists(child):
            os.kill(child, signal.SIGKILL)

    # The parent died before the signal was set: the command is not run at all.
    late = subprocess.run([sys.executable, "-m", "mqi.die_with_parent", "1", "touch", "ran"],
                          capture_output=True, text=True, cwd=tmp_path)
    assert late.returncode == PARENT_GONE and "parent 1 has already ended" in late.stderr
    assert not (tmp_path / "ran").exists()


def start_mqi_run(config: Path, root: Path, log: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    return subprocess.Popen([*MQI, "--config", str(config), "run"], cwd=root, env=env,
                            stdout=open(log, "wb"), stderr=subprocess.STDOUT, start_new_session=True)


def wait_until_serving(job: subprocess.Popen, log: Path) -> str:
    """The API URL `mqi run` prints once its embedded server answers."""
    def ui_line():
        assert job.poll() is None, log.read_text()[-3000:]
        return next((l for l in log.read_text().splitlines() if l.startswith("Prefect UI:")), None)

    api_url = wait_for(ui_line, timeout=180, what="the UI address").split("API ")[1].rstrip(")")
    assert api_call(api_url, "/health") is True
    return api_url


def end_group(job: subprocess.Popen) -> None:
    try:
        os.killpg(job.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    job.wait()


def test_kill_9_of_mqi_run_ends_its_server_and_a_new_mqi_run_starts(tmp_path):
    config = write_config(tmp_path)
    settings = Settings(state_dir=tmp_path / ".mqi")
    first = start_mqi_run(config, tmp_path, tmp_path / "first.log")
    server_pid = None
    try:
        wait_until_serving(first, tmp_path / "first.log")
        server_pid = record_of(settings)["pid"]
        assert process_group(server_pid), "the server leads its own process group"

        first.send_signal(signal.SIGKILL)  # `mqi run` alone, as the OOM killer would
        first.wait()
        wait_for(lambda: process_group(server_pid) == [], timeout=30, what="every server process to end")
    finally:
        end_group(first)
        if server_pid and process_group(server_pid):
            os.killpg(server_pid, signal.SIGKILL)  # never leave a server behind

    second_log = tmp_path / "second.log"
    second = start_mqi_run(config, tmp_path, second_log)
    try:
        wait_until_serving(second, second_log)
        assert record_of(settings)["owner"]["pid"] == second.pid
        new_server = record_of(settings)["pid"]
        second.send_signal(signal.SIGTERM)  # systemd's stop
        assert second.wait(90) == 0, second_log.read_text()[-3000:]
    finally:
        end_group(second)
    assert process_group(new_server) == []
    assert not (prefect_home(settings) / SERVER_RECORD).exists()  # stopped by mqi run, not by the kernel
    output = second_log.read_text()
    assert "mqi run: stopped" in output and "error:" not in output, output[-3000:]


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
