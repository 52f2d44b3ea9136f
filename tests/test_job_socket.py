"""`mqi status` and `mqi show` answered by the running main job over its local socket, and the
ledger read directly whenever that job has other settings, is gone or cannot answer."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from typer.testing import CliRunner

from mqi import job_socket
from mqi.cli import app
from mqi.job_answers import JobAnswers
from mqi.ledger import Ledger
from mqi.settings_inputs import SettingsInputs

SEOUL = ZoneInfo("Asia/Seoul")


@pytest.fixture(autouse=True)
def own_settings_and_socket_folder(monkeypatch, tmp_path):
    """No MQI_ variables from outside; a socket folder of this test's own, with a short path
    (a socket path must fit in 108 bytes); the working folder is the test's."""
    for name in list(os.environ):
        if name.startswith("MQI_") and not name.startswith("MQI_TEST_"):
            monkeypatch.delenv(name)
    short = Path(tempfile.mkdtemp(prefix="mqi-t", dir="/tmp"))
    monkeypatch.setenv("TMPDIR", str(short))
    monkeypatch.chdir(tmp_path)
    yield
    shutil.rmtree(short, ignore_errors=True)


@pytest.fixture
def site_files(ledger_url, tmp_path, monkeypatch):
    """A ledger with two cases and the settings file naming it, exported as the job does."""
    with Ledger.open(ledger_url) as ledger:
        first, _ = ledger.register_case(tmp_path / "inbox" / "first_case")
        ledger.register_case(tmp_path / "inbox" / "케이스_둘")
        ledger.transition(first.id, "uploading", actor="test")
    config = tmp_path / "mqi.yaml"
    config.write_text(json.dumps({"ledger": {"url": ledger_url}, "timezone": "Asia/Seoul"}))
    monkeypatch.setenv("MQI_CONFIG", str(config))
    return config


@pytest.fixture
def job(site_files, ledger_url):
    """JobAnswers on the open ledger, as `mqi run` holds them while it runs."""
    with Ledger.open(ledger_url) as ledger, JobAnswers(ledger, SEOUL, SettingsInputs.of_this_process()) as answers:
        yield answers


def cold(*arguments: str):
    """The command run here, reading the ledger itself."""
    return CliRunner().invoke(app, list(arguments))


def warm(capsys, *arguments: str) -> tuple[int | None, str, str]:
    code = job_socket.ask_running_job(list(arguments))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("arguments", [["status"], ["status", "--json"], ["status", "--state", "uploading"],
                                       ["show", "1"], ["show", "2", "--json"]])
def test_the_job_answers_exactly_what_the_command_prints(job, capsys, arguments):
    code, out, err = warm(capsys, *arguments)
    expected = cold(*arguments)

    assert (code, err) == (0, "")
    assert job.answered == 1
    if arguments[0] == "status" and "--json" not in arguments:  # the age column may tick between the two
        assert out.splitlines()[:2] == expected.output.splitlines()[:2]
        assert [line.split()[:3] for line in out.splitlines()[2:]] == \
               [line.split()[:3] for line in expected.output.splitlines()[2:]]
    else:
        assert out == expected.output


def test_an_unknown_case_is_the_same_error_and_exit_code(job, capsys):
    code, out, err = warm(capsys, "show", "nope")

    assert (code, out) == (1, "")
    assert err == "error: no case has the id, uid or folder 'nope'\n"


def test_usage_errors_and_help_are_left_to_the_full_command_line(job, capsys):
    for arguments in (["status", "--state", "bogus"], ["show"], ["status", "--help"], ["--help"], ["cancel", "1"]):
        assert warm(capsys, *arguments)[0] is None, arguments
    assert job.answered == 0


def test_colors_only_for_a_terminal_as_click_gives_them(job):
    request = {"digest": job.inputs.digest(), "args": ["show", "1"]}
    colored = job.reply({**request, "color": True})["stdout"]
    plain = job.reply({**request, "color": False})["stdout"]

    assert colored == CliRunner().invoke(app, ["show", "1"], color=True).output
    assert "\x1b[1m" in colored and "\x1b[" not in plain
    assert plain == cold("show", "1").output


def test_other_settings_are_not_answered_by_this_job(job, capsys, site_files, tmp_path, monkeypatch):
    monkeypatch.setenv("MQI_CASE__POLL_SECONDS", "3")
    assert warm(capsys, "status")[0] is None
    monkeypatch.delenv("MQI_CASE__POLL_SECONDS")

    other = tmp_path / "elsewhere"
    other.mkdir()
    monkeypatch.chdir(other)  # relative paths in the settings would mean other files
    assert warm(capsys, "status")[0] is None
    monkeypatch.chdir(tmp_path)

    site_files.write_text(site_files.read_text().replace("Asia/Seoul", "UTC"))  # edited since the job started
    assert warm(capsys, "status")[0] is None
    assert job.answered == 0


def test_the_same_file_named_any_way_is_the_same_job(job, capsys, site_files, monkeypatch):
    monkeypatch.delenv("MQI_CONFIG")
    assert warm(capsys, "--config", "mqi.yaml", "status")[0] == 0
    assert warm(capsys, "-c", str(site_files), "show", "1")[0] == 0
    assert warm(capsys, f"--config={site_files}", "status", "--json")[0] == 0
    monkeypatch.setenv("MQI_CONFIG", "./mqi.yaml")
    assert warm(capsys, "status")[0] == 0
    assert job.answered == 4


def test_no_job_a_stopped_job_or_a_dead_socket_means_reading_the_ledger(site_files, ledger_url, capsys):
    assert warm(capsys, "status")[0] is None  # no job ever

    with Ledger.open(ledger_url) as ledger, JobAnswers(ledger, SEOUL, SettingsInputs.of_this_process()) as answers:
        path = answers.path
        assert warm(capsys, "status")[0] == 0
    assert not path.exists()
    assert warm(capsys, "status")[0] is None

    with socket.socket(socket.AF_UNIX) as dead:  # a socket file whose job was killed
        dead.bind(str(path))
    assert path.exists() and warm(capsys, "status")[0] is None


def test_a_socket_folder_others_can_enter_is_not_used(site_files, ledger_url, capsys):
    folder = job_socket.socket_dir()
    folder.mkdir(mode=0o755)
    folder.chmod(0o755)
    with Ledger.open(ledger_url) as ledger, JobAnswers(ledger, SEOUL, SettingsInputs.of_this_process()) as answers:
        assert answers.path is None
        assert warm(capsys, "status")[0] is None
    assert list(folder.iterdir()) == []


def test_a_new_mqi_process_gets_the_answer_from_the_job(job, tmp_path):
    result = subprocess.run([sys.executable, "-c", "from mqi.cli import main; main()", "show", "2"],
                            capture_output=True, text=True, timeout=60, cwd=tmp_path, env=os.environ.copy())

    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("case 2  케이스_둘")
    assert job.answered == 1


def test_the_digest_follows_every_input_and_the_socket_name_shows_no_secret(site_files, monkeypatch):
    def inputs(explicit=None):
        return SettingsInputs.of_this_process(explicit)

    base = inputs()
    assert inputs(Path("mqi.yaml")).digest() == base.digest()  # relative or absolute, named or from MQI_CONFIG
    linked = site_files.with_name("linked.yaml")
    linked.symlink_to(site_files)
    assert inputs(linked).digest() == base.digest()  # the file itself, however it is reached
    for name, value in (("MQI_TIMEZONE", "UTC"), ("mqi_timezone", "UTC"), ("PGHOST", "elsewhere")):
        monkeypatch.setenv(name, value)
        assert inputs().digest() != base.digest(), name
        monkeypatch.delenv(name)
    monkeypatch.setenv("MQI_LEDGER__URL", "postgresql://mqi:first-secret@db/mqi")
    with_password = inputs()
    monkeypatch.setenv("MQI_LEDGER__URL", "postgresql://mqi:other-secret@db/mqi")
    assert inputs().digest() != with_password.digest()
    assert inputs().public_digest() == with_password.public_digest()  # the values are not in the name
    site_files.write_text(site_files.read_text() + "\n")
    assert inputs().digest() != with_password.digest()


def test_the_job_answers_exactly_the_commands_the_client_asks_it():
    from mqi import job_answers

    assert set(job_answers._OUTPUTS) == job_socket.QUICK_COMMANDS


def test_split_command_finds_the_quick_commands():
    assert job_socket.split_command(["status"]) == (None, ["status"])
    assert job_socket.split_command(["-c", "a.yaml", "show", "3"]) == (Path("a.yaml"), ["show", "3"])
    for not_quick in ([], ["run"], ["db", "upgrade"], ["--version"], ["show", "--help"], ["--config"]):
        assert job_socket.split_command(not_quick) is None, not_quick


def test_show_by_uid_and_by_a_folder_relative_to_the_working_folder(job, capsys):
    uid = job.ledger.get_case(1).uid
    for reference in (uid, "inbox/first_case", "./inbox/first_case"):
        code, out, _ = warm(capsys, "show", reference, "--json")
        assert code == 0 and out == cold("show", reference, "--json").output, reference
    assert json.loads(out)["name"] == "first_case"


def test_a_socket_folder_that_cannot_be_made_leaves_the_job_running_without_it(site_files, ledger_url, capsys):
    job_socket.socket_dir().write_text("someone else's file")
    with Ledger.open(ledger_url) as ledger, JobAnswers(ledger, SEOUL, SettingsInputs.of_this_process()) as answers:
        assert answers.path is None
        assert warm(capsys, "status")[0] is None


def test_odd_requests_get_no_answer_and_do_not_stop_the_job(job, capsys):
    digest = job.inputs.digest()
    for request in ([], {"args": ["status"]}, {"digest": digest, "args": [["status"]]},
                    {"digest": digest, "args": "status"}, {"digest": digest, "args": ["status", 3]}):
        assert job.reply(request) == {}, request
    with socket.socket(socket.AF_UNIX) as silent, socket.socket(socket.AF_UNIX) as garbled:
        silent.connect(str(job.path))  # says nothing: the job stops listening to it after a while
        garbled.connect(str(job.path))
        garbled.sendall(b"\xff{not json\n")
        garbled.shutdown(socket.SHUT_WR)
        assert garbled.recv(100) == b""
        assert warm(capsys, "show", "1")[0] == 0


def test_too_many_askers_at_once_read_the_ledger_themselves(job):
    request = {"digest": job.inputs.digest(), "args": ["status"]}
    held = [job._room.acquire(blocking=False) for _ in range(2)]
    assert held == [True, True]
    assert job.reply(request) == {}
    job._room.release()
    assert job.reply(request)["exit_code"] == 0


def test_a_terminal_that_cannot_show_a_name_gets_the_full_command(job, tmp_path):
    result = subprocess.run([sys.executable, "-c", "from mqi.cli import main; main()", "show", "2"],
                            capture_output=True, timeout=60, cwd=tmp_path,
                            env={**os.environ, "PYTHONIOENCODING": "ascii"})

    assert (result.returncode, result.stderr) == (0, b"")
    assert result.stdout.startswith("case 2  케이스_둘".encode())  # click writes UTF-8 to an ASCII stream
