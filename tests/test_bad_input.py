"""A catalogue of bad input: each gets a clear error or works, and never stops other cases.

Folder names and contents go end to end through process-case (real sshd, the pueue
stand-in) in one batch, so a bad case sits among good ones; settings, pueue output and
queue refusals are checked where they enter. docs/reliability.md lists the catalogue.
"""

from __future__ import annotations

import json
import os
import shlex
import stat
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from mqi.cli import full_app as cli_app
from mqi.errors import ConfigError
from mqi.ledger import Ledger, LedgerError
from mqi.ledger.states import CaseState, FailureCategory
from mqi.queue.pueue import PueueQueue
from mqi.queue.pueue_json import PueueOutputError
from mqi.settings import load_settings
from mqi.transport.local import LocalTransport
from tests.support.cases import (
    case_state,
    run_case,
    settings_for,
    ssh_host,
    start,
    wait_for,
)
from tests.support.faults import partial_bytes, small_filesystem, tree_digest

ENGINE = "mkdir -p output && find . -path ./output -prune -o -type f -print | sort > output/listing"
CANARY = "MQI_CANARY"
SHELL_BAIT = f"touch {CANARY}"  # relative: lands in whatever folder a shell ran it

#: odd but valid folder names: each case must complete, its results under its own name
ODD_NAMES = {
    "spaces": "case with  spaces",
    "quotes": "it's a \"quoted\" case",
    "semicolon": f"case; {SHELL_BAIT}",
    "command substitution": f"$({SHELL_BAIT})",
    "backticks": f"`{SHELL_BAIT}`",
    "newline": "first line\nsecond line",
    "leading dash": "-rf --no-preserve-root",
    "glob characters": "case*?[0-9]",
    "very long (250 bytes)": "L" * 250,
}
NON_UTF8_NAME = b"caf\xe9-latin1"
# The user's shell, not the test harness: no Prefect or mqi settings leak into `mqi` commands.
CLEAN_ENV = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MQI_"))}


def canaries(tmp_path: Path) -> list[Path]:
    """Canary files anywhere a shell could have run: the test folders, here, home."""
    places = [tmp_path.rglob(CANARY), [Path.cwd() / CANARY, Path.home() / CANARY]]
    return [path for found in places for path in found if path.exists()]


def _inbox(tmp_path: Path) -> Path:
    inbox = tmp_path / "inbox"
    inbox.mkdir(exist_ok=True)
    return inbox


def good_case(inbox: Path, name: str | bytes) -> Path:
    folder = Path(os.fsdecode(os.path.join(os.fsencode(inbox), os.fsencode(name))))
    folder.mkdir()
    (folder / "RTPLAN.dcm").write_bytes(b"DICM")
    (folder / f"beam $({SHELL_BAIT}).log").write_text("spot,mu\n")  # a file name as bait too
    return folder


#: bad case folders: (how to make it, expected failure text); each fails alone with INPUT
def _absolute_symlink(folder: Path) -> None:
    (folder / "plan.dcm").symlink_to("/etc/passwd")


def _escaping_symlink(folder: Path) -> None:
    (folder / "up").symlink_to("../../..")


def _fifo(folder: Path) -> None:
    os.mkfifo(folder / "pipe")


def _device(folder: Path) -> None:
    os.mknod(folder / "null", stat.S_IFCHR | 0o600, os.makedev(1, 3))


BAD_CONTENTS = {
    "symlink to an absolute path": (_absolute_symlink, "symbolic link to an absolute path"),
    "symlink leaving the case": (_escaping_symlink, "symbolic link leaving the folder"),
    "named pipe": (_fifo, "not a file"),
    "device file": (_device, "not a file"),
}


def test_odd_names_and_bad_contents_in_one_batch(tmp_path, sshd, fake_pueue):
    fake_pueue.add_group("gpu", 4)
    host = ssh_host(tmp_path, sshd, fake_pueue, groups=({"name": "gpu", "slots": 4},))
    site = start(settings_for(tmp_path, [host], command=ENGINE))
    inbox = _inbox(tmp_path)
    good = {label: good_case(inbox, name) for label, name in ODD_NAMES.items()}
    good["non-UTF-8 bytes"] = good_case(inbox, NON_UTF8_NAME)
    good["empty folder"] = inbox / "empty"
    good["empty folder"].mkdir()
    bad = {}
    for label, (spoil, _) in BAD_CONTENTS.items():
        bad[label] = good_case(inbox, f"bad {label}")
        spoil(bad[label])

    # as scan-inbox does: registered from the folder, then processed by id (a non-UTF-8
    # path cannot travel as a Prefect parameter)
    ids = [str(site.ledger.register_case(f, actor="scan-inbox")[0].id) for f in [*good.values(), *bad.values()]]
    with ThreadPoolExecutor(max_workers=6) as pool:
        states = dict(zip([*good, *bad], pool.map(run_case, ids)))

    for label, folder in good.items():
        case = site.ledger.find_case(str(folder))
        assert states[label] == "completed", f"{label}: {case.state} {case.failure_message}"
        listing = (Path(case.results_path) / "listing").read_text()
        assert listing == ("" if label == "empty folder" else f"./RTPLAN.dcm\n./beam $({SHELL_BAIT}).log\n")
    for label, folder in bad.items():
        case = site.ledger.find_case(str(folder))
        assert states[label] == "failed" and case.failure_category is FailureCategory.INPUT, label
        assert BAD_CONTENTS[label][1] in case.failure_message and str(folder) in case.failure_message
        assert site.ledger.attempts(case.id) == [], f"{label}: submitted although its input was refused"
    assert canaries(tmp_path) == [], "a name was executed by a shell"


def test_case_folder_changed_while_uploading_fails_as_input(tmp_path, sshd, fake_pueue):
    host = ssh_host(tmp_path, sshd, fake_pueue)
    site = start(settings_for(tmp_path, [host], command=ENGINE))
    folder = good_case(_inbox(tmp_path), "growing")
    big = folder / "machine.log"
    big.write_bytes(b"x" * 48 * 2**20)
    with ThreadPoolExecutor(max_workers=1) as pool:
        state = pool.submit(run_case, folder)
        wait_for(lambda: case_state(site, folder) is not None, what="registration")
        uid = site.ledger.find_case(str(folder)).uid
        wait_for(lambda: partial_bytes(Path(host["workdir"]), uid) > 0, timeout=60, what="the upload")
        with big.open("ab") as grow:
            grow.write(b"more lines written by the machine")
        assert state.result(timeout=60) == "failed"
    case = site.ledger.find_case(str(folder))
    assert case.failure_category is FailureCategory.INPUT
    assert "'machine.log' changed while the folder was being read" in case.failure_message
    assert not (Path(host["workdir"]) / uid).exists(), "a partial upload was put in place"


def test_case_folder_replaced_while_uploading_is_never_sent_mixed(tmp_path, sshd, fake_pueue):
    """The folder is swapped for another one mid-upload: the host gets the old folder whole
    (files already open are read to the end, and checked), or the case fails as input."""
    host = ssh_host(tmp_path, sshd, fake_pueue)
    site = start(settings_for(tmp_path, [host], command=ENGINE))
    folder = good_case(_inbox(tmp_path), "replaced")
    (folder / "machine.log").write_bytes(b"x" * 48 * 2**20)
    old = tree_digest(folder)
    with ThreadPoolExecutor(max_workers=1) as pool:
        state = pool.submit(run_case, folder)
        wait_for(lambda: case_state(site, folder) is not None, what="registration")
        uid = site.ledger.find_case(str(folder)).uid
        wait_for(lambda: partial_bytes(Path(host["workdir"]), uid) > 0, timeout=60, what="the upload")
        folder.rename(folder.with_name("replaced.old"))
        good_case(_inbox(tmp_path), "replaced")
        (folder / "RTPLAN.dcm").write_bytes(b"DICM another plan")
        final = state.result(timeout=60)
    case = site.ledger.find_case(str(folder))
    if final == "completed":
        sent = {k: v for k, v in tree_digest(Path(host["workdir"]) / uid).items() if not k.startswith("output/")}
        assert sent == old, "the host got a mix of the old and the new folder"
    else:
        assert case.failure_category is FailureCategory.INPUT, case.failure_message


def test_case_folder_gone_before_upload_fails_as_input(tmp_path, sshd, fake_pueue):
    site = start(settings_for(tmp_path, [ssh_host(tmp_path, sshd, fake_pueue)], command=ENGINE))
    folder = good_case(_inbox(tmp_path), "vanishing")
    case, _ = site.ledger.register_case(folder)
    folder.rename(folder.with_name("moved away"))

    assert run_case(str(case.id)) == "failed"
    case = site.ledger.get_case(case.id)
    assert case.failure_category is FailureCategory.INPUT and "does not exist" in case.failure_message


def test_engine_that_succeeds_without_writing_results_fails_clearly(tmp_path, sshd, fake_pueue):
    site = start(settings_for(tmp_path, [ssh_host(tmp_path, sshd, fake_pueue)], command="true"))
    folder = good_case(_inbox(tmp_path), "no-output")

    assert run_case(folder) == "failed"
    case = site.ledger.find_case(str(folder))
    assert case.failure_category is FailureCategory.ENGINE
    assert "exited with code 0 but wrote no results" in case.failure_message
    assert site.ledger.live_attempt(case.id) is None


def _output_linked_out_of_the_case(elsewhere: Path) -> tuple[str, str]:
    return (f"ln -s {shlex.quote(str(elsewhere))} output",
            f"results refused: 'output' is a symbolic link (to {str(elsewhere)!r}): "
            "results are only taken from a real folder inside the case")


def _link_to_root_in_output(elsewhere: Path) -> tuple[str, str]:
    return ("mkdir output && cp RTPLAN.dcm output/ && ln -s / output/root",
            "results refused: 'output/root' is a symbolic link to an absolute path ('/')")


@pytest.mark.parametrize("engine", [_output_linked_out_of_the_case, _link_to_root_in_output])
def test_results_linking_out_of_the_case_fail_as_engine_through_mqi_submit(tmp_path, sshd, fake_pueue,
                                                                           prefect_server, engine):
    """`mqi submit` as a user types it: the case fails with the link named, never stays
    `downloading`, nothing of it (or of the folder it points to) lands in results_dir, and the
    host keeps its files."""
    elsewhere = tmp_path / "another patient"
    elsewhere.mkdir()
    (elsewhere / "dose.dcm").write_text("not this case's")
    command, expected = engine(elsewhere)
    settings = settings_for(tmp_path, [ssh_host(tmp_path, sshd, fake_pueue)], command=command)
    config = tmp_path / "mqi.yaml"
    config.write_text(yaml.safe_dump(settings.masked() | {"ledger": {"url": settings.ledger.url.get_secret_value()},
                                                          "prefect": {"api_url": prefect_server}}))
    site = start(settings)
    folder = good_case(_inbox(tmp_path), "linked-results")

    submit = subprocess.run([sys.executable, "-m", "mqi.cli", "--config", str(config), "submit", str(folder)],
                            cwd=tmp_path, env=CLEAN_ENV, capture_output=True, text=True, timeout=300)

    assert (submit.returncode, submit.stdout) == (1, "case linked-results: failed\n"), submit.stderr[-3000:]
    assert "Traceback" not in submit.stderr, submit.stderr[-3000:]
    case = site.ledger.find_case(str(folder))
    assert case.failure_category is FailureCategory.ENGINE and case.failure_message == expected
    (attempt,) = site.ledger.attempts(case.id)
    assert not attempt.live and site.ledger.live_attempt(case.id) is None
    results = site.settings.results_dir
    assert not results.exists() or os.listdir(results) == [], "something was put in results_dir"
    on_host = Path(attempt.remote_dir)
    assert (on_host / "RTPLAN.dcm").exists() and os.path.lexists(on_host / "output"), "the host's files were touched"
    assert os.listdir(elsewhere) == ["dose.dcm"]


def test_results_linked_out_by_a_task_that_vanished_fail_as_engine(tmp_path, sshd, fake_pueue,
                                                                    prefect_server):
    """Decided from what the task left on the host (it was cleaned from pueue before its end
    was seen): the same refusal, not `lost`, and nothing fetched."""
    elsewhere = tmp_path / "another patient"
    elsewhere.mkdir()
    (elsewhere / "dose.dcm").write_text("not this case's")
    gate = tmp_path / "finish now"
    command = (f"while [ ! -e {shlex.quote(str(gate))} ]; do sleep 0.05; done; "
               f"ln -s {shlex.quote(str(elsewhere))} output")
    site = start(settings_for(tmp_path, [ssh_host(tmp_path, sshd, fake_pueue)], command=command, poll_seconds=8))
    folder = good_case(_inbox(tmp_path), "linked-and-cleaned")
    with ThreadPoolExecutor(max_workers=1) as pool:
        state = pool.submit(run_case, folder)
        # The case turns `running` right after a poll: the next one is 8 s away, time enough
        # to let the task end and clean it from pueue unseen.
        wait_for(lambda: case_state(site, folder) is CaseState.RUNNING, timeout=60, what="the task to run")
        gate.touch()
        wait_for(lambda: any("Done" in task["status"] for task in fake_pueue.store.read()["tasks"].values()),
                 timeout=60, what="the task to finish")
        fake_pueue.clean()
        assert state.result(timeout=60) == "failed"

    case = site.ledger.find_case(str(folder))
    (attempt,) = site.ledger.attempts(case.id)
    assert attempt.exit_code is None, "the task's end was seen: not the vanished-task path"
    assert case.failure_category is FailureCategory.ENGINE
    assert case.failure_message.startswith("results refused: 'output' is a symbolic link (to "), case.failure_message
    assert site.ledger.live_attempt(case.id) is None
    assert not (site.settings.results_dir / folder.name).exists()


# -- hosts and queues that refuse ----------------------------------------------------------


def test_group_unknown_to_pueue_fails_the_case_clearly_and_others_go_on(tmp_path, sshd, fake_pueue):
    groups = ({"name": "default", "slots": 1}, {"name": "nosuch", "slots": 1})
    site = start(settings_for(tmp_path, [ssh_host(tmp_path, sshd, fake_pueue, groups=groups)], command=ENGINE))
    inbox = _inbox(tmp_path)
    wrong, right = good_case(inbox, "wrong-group"), good_case(inbox, "right-group")

    with pytest.raises(Exception, match="no pueue group 'nosuch' on this host"):
        run_case(wrong, group="nosuch")
    assert run_case(right, group="default") == "completed"
    assert case_state(site, wrong) is not CaseState.COMPLETED
    assert len(fake_pueue.status()["tasks"]) == 1


def test_paused_group_accepts_the_task_which_waits_until_started(tmp_path, sshd, fake_pueue):
    site = start(settings_for(tmp_path, [ssh_host(tmp_path, sshd, fake_pueue)], command=ENGINE))
    fake_pueue.pause_group("default")
    folder = good_case(_inbox(tmp_path), "paused-group")
    with ThreadPoolExecutor(max_workers=1) as pool:
        state = pool.submit(run_case, folder)
        wait_for(lambda: case_state(site, folder) is CaseState.QUEUED, timeout=60, what="the task to be queued")
        from mqi.host_report import check_host

        report = check_host(site, site.settings.hosts[0], timeout=15)
        assert [(g.name, g.on_host, g.queued) for g in report.groups] == [("default", "paused", 1)]
        fake_pueue.start_group("default")
        assert state.result(timeout=60) == "completed"


def assert_back_in_line(site, folder: Path, reason: str) -> None:
    """A host-side refusal leaves the case pending (tried again later), the reason recorded."""
    case = site.ledger.find_case(str(folder))
    last = site.ledger.events(case.id)[-1]
    assert (case.state, last.to_state) == (CaseState.PENDING, CaseState.PENDING), case.state
    assert reason in last.message and site.ledger.attempts(case.id) == []


def test_missing_remote_workdir_is_created(tmp_path, sshd, fake_pueue):
    host = ssh_host(tmp_path, sshd, fake_pueue) | {"workdir": str(tmp_path / "not" / "yet" / "there")}
    start(settings_for(tmp_path, [host], command=ENGINE))
    assert run_case(good_case(_inbox(tmp_path), "new-workdir")) == "completed"


def test_remote_workdir_that_cannot_exist_is_a_clear_error(tmp_path, sshd, fake_pueue):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    host = ssh_host(tmp_path, sshd, fake_pueue) | {"workdir": str(blocker / "work")}
    site = start(settings_for(tmp_path, [host], command=ENGINE))
    folder = good_case(_inbox(tmp_path), "impossible-workdir")

    with pytest.raises(Exception, match="Not a directory|not a folder"):
        run_case(folder)
    assert_back_in_line(site, folder, "Not a directory")
    assert fake_pueue.status()["tasks"] == {}


@pytest.fixture
def tiny_remote_disk(tmp_path):
    with small_filesystem(tmp_path / "remote", "1m") as mount_point:
        yield mount_point


def test_full_remote_disk_is_a_clear_error_and_nothing_is_submitted(tmp_path, sshd, fake_pueue, tiny_remote_disk):
    site = start(settings_for(tmp_path, [ssh_host(tmp_path, sshd, fake_pueue)], command=ENGINE))
    folder = good_case(_inbox(tmp_path), "too-big")
    (folder / "machine.log").write_bytes(os.urandom(4 * 2**20))

    with pytest.raises(Exception, match="No space left on device"):
        run_case(folder)
    assert_back_in_line(site, folder, "No space left on device")
    assert fake_pueue.status()["tasks"] == {}
    assert list(tiny_remote_disk.iterdir()) == [], "a partial upload was left on the host"


# -- pueue output we cannot read -------------------------------------------------------------


def stub_pueue(tmp_path: Path, output: str) -> str:
    """A `pueue` that prints `output` whatever it is asked."""
    (tmp_path / "out.txt").write_text(output)
    script = tmp_path / "pueue"
    script.write_text(f"#!/bin/sh\ncat {tmp_path / 'out.txt'}\n")
    script.chmod(0o755)
    return str(script)


PUEUE_OUTPUTS = {
    "not JSON": "Error: the daemon is restarting\n",
    "truncated JSON": '{"tasks": {"0": {"id": 0, "label": "mqi-x", "status": ',
    "empty output": "",
    "an unknown version's shape": '{"version": 9, "queue": [{"task": 0, "state": "running"}]}',
    "tasks of the wrong type": '{"tasks": [1, 2, 3], "groups": {}}',
}


@pytest.mark.parametrize("output", PUEUE_OUTPUTS.values(), ids=PUEUE_OUTPUTS.keys())
def test_unreadable_pueue_status_is_a_clear_error(tmp_path, output):
    queue = PueueQueue(LocalTransport("gpu-7"), pueue=stub_pueue(tmp_path, output))
    with pytest.raises(PueueOutputError, match=r"host 'gpu-7': cannot read the output of `pueue status"):
        queue.snapshot()


def garbling_pueue(tmp_path: Path, fake_pueue, switch: Path) -> str:
    """The fake pueue, except that `status` prints cut-off JSON while `switch` exists."""
    script = tmp_path / "garbling-pueue"
    script.write_text(f"""#!/bin/sh
if [ -e '{switch}' ] && [ "$3" = status ]; then printf '{{"tasks": {{"0": {{"id": '; exit 0; fi
exec '{fake_pueue.bin}' "$@"
""")
    script.chmod(0o755)
    return str(script)


def test_pueue_status_garbled_for_a_while_does_not_fail_a_waiting_case(tmp_path, sshd, fake_pueue):
    switch = tmp_path / "garble"
    host = ssh_host(tmp_path, sshd, fake_pueue) | {"pueue": garbling_pueue(tmp_path, fake_pueue, switch)}
    site = start(settings_for(tmp_path, [host], command="sleep 5; " + ENGINE))
    folder = good_case(_inbox(tmp_path), "garbled-status")
    with ThreadPoolExecutor(max_workers=1) as pool:
        state = pool.submit(run_case, folder)
        wait_for(lambda: case_state(site, folder) is CaseState.RUNNING, timeout=60, what="the case to run")
        switch.touch()
        time.sleep(3)
        switch.unlink()
        assert state.result(timeout=120) == "completed"
    assert len(fake_pueue.status()["tasks"]) == 1


# -- settings --------------------------------------------------------------------------------


def write_yaml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "mqi.yaml"
    path.write_text(textwrap.dedent(text))
    return path


SSH_HOST = """
  - name: gpu1
    transport: ssh
    queue: pueue
    hostname: 127.0.0.1
    username: mqi
    key_file: {key}
    groups: [{{name: gpu0}}]
"""

BAD_SETTINGS = {
    "unknown key": ("hosts: [{name: a, groups: [{name: g}]}]\nresult_dir: x\n", "result_dir: unknown key"),
    "duplicate host names": ("hosts:\n  - {name: a, groups: [{name: g}]}\n  - {name: a, groups: [{name: g}]}\n",
                             "duplicate host names: a"),
    "duplicate group names": ("hosts:\n  - {name: a, groups: [{name: g}, {name: g}]}\n", "duplicate"),
    "missing key file": ("hosts:" + SSH_HOST.format(key="/nonexistent/id_ed25519"),
                         "key_file '/nonexistent/id_ed25519' does not exist"),
    "zero slots": ("hosts: [{name: a, groups: [{name: g, slots: 0}]}]\n", "slots"),
    "unknown time zone": ("timezone: Mars/Olympus\n", "unknown time zone 'Mars/Olympus'"),
    "not a database URL": ("ledger: {url: 'mqi.db'}\n", "ledger"),
    "a name that is a shell command": ("hosts: [{name: 'a;rm -rf /', groups: [{name: g}]}]\n", "hosts.0.name"),
}


@pytest.mark.parametrize("text,expected", BAD_SETTINGS.values(), ids=BAD_SETTINGS.keys())
def test_invalid_settings_name_the_problem(tmp_path, text, expected):
    with pytest.raises(ConfigError) as raised:
        load_settings(write_yaml(tmp_path, text))
    assert expected in str(raised.value)


def test_pin_to_an_unknown_group_is_refused_by_name(tmp_path):
    from mqi import casework
    from mqi.runtime import use_settings

    site = use_settings(settings_for(tmp_path, [{"name": "h", "groups": [{"name": "gpu0"}]}]))
    case, _ = site.ledger.register_case(good_case(_inbox(tmp_path), "pinned"))
    with pytest.raises(Exception, match="no configured group matches host='h' group='gpu9'"):
        casework.choose_placement(site, case, "h", "gpu9")


# -- bad settings through the command line ----------------------------------------------------

MQI = [sys.executable, "-m", "mqi.cli"]
DB_PASSWORD = "CANARY-DB-PW"
UNKNOWN_DRIVER_URL = f"postgresql+nodriver://mqi:{DB_PASSWORD}@db.example/mqi"


@pytest.fixture
def user_shell(tmp_path, monkeypatch):
    """A user's shell in `tmp_path`: none of the test run's `MQI_` variables."""
    monkeypatch.chdir(tmp_path)
    for name in list(os.environ):
        if name.upper().startswith("MQI_"):
            monkeypatch.delenv(name)


def mqi(*args: str, cwd: Path, **variables: str) -> subprocess.CompletedProcess:
    """`mqi ARGS` in a process of its own, as a user types it: a traceback would be printed."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("MQI_", "PREFECT_"))}
    return subprocess.run([*MQI, *args], cwd=cwd, env=environment | variables,
                          capture_output=True, text=True, timeout=120)


def config_check(tmp_path: Path, text: str | None = None, **variables: str) -> tuple[int, str]:
    """Exit code and output (stdout and stderr) of `mqi config check` on `text` as ./mqi.yaml.
    In this process, for speed: an exception that would print a traceback fails the test."""
    if text is not None:
        write_yaml(tmp_path, text)
    result = CliRunner().invoke(cli_app(), ["config", "check"], env=variables, catch_exceptions=False)
    return result.exit_code, result.output


def test_duplicate_keys_are_named_with_both_lines(tmp_path, user_shell):
    code, output = config_check(tmp_path, """\
        case:
          poll_seconds: 2
          timeout_hours: 1
          poll_seconds: 3
        hosts:
          - name: a
            groups:
              - {name: g, slots: 1}
              - name: h
                slots: 1
                slots: 2
            name: b
        timezone: UTC
        timezone: Asia/Seoul
        """)
    assert code == 2
    assert "mqi.yaml: key 'poll_seconds' in 'case' appears twice (lines 2 and 4)" in output
    assert "mqi.yaml: key 'name' in 'hosts[0]' appears twice (lines 6 and 12)" in output
    assert "mqi.yaml: key 'slots' in 'hosts[0].groups[1]' appears twice (lines 10 and 11)" in output
    assert "mqi.yaml: key 'timezone' appears twice (lines 13 and 14)" in output

    # the same mapping reached twice through an alias is not a key given twice
    code, output = config_check(tmp_path, """\
        hosts:
          - {name: a, groups: &gpus [{name: g0}, {name: g1}]}
          - {name: b, groups: *gpus}
        """)
    assert code == 0, output


def test_inbox_that_is_a_file_is_refused_by_config_check_and_run(tmp_path, user_shell):
    inbox = tmp_path / "inbox"
    inbox.write_text("not a folder\n")
    text = f"inbox: {{path: inbox}}\nledger: {{url: 'sqlite:///{tmp_path}/mqi.db'}}\n"
    problem = f"inbox.path: '{inbox}' exists but is not a folder"

    code, output = config_check(tmp_path, text)
    assert code == 2 and problem in output

    run = mqi("run", cwd=tmp_path)
    assert run.returncode == 2
    assert problem in run.stderr and "Traceback" not in run.stdout + run.stderr
    assert inbox.read_text() == "not a folder\n"  # nothing lost
    assert not (tmp_path / "mqi.db").exists()  # refused before anything was started

    code, output = config_check(tmp_path, "inbox: {path: inbox/cases}\n")
    assert code == 2 and f"inbox.path: '{inbox}/cases' cannot be created: '{inbox}' is not a folder" in output

    code, output = config_check(tmp_path, f"inbox: {{path: {'x' * 300}}}\n")
    assert code == 2 and "cannot be checked: File name too long" in output

    # a missing inbox stays fine: `mqi run` creates it
    code, output = config_check(tmp_path, "inbox: {path: new/inbox}\n")
    assert code == 0, output


BAD_LEDGER_URLS = {
    "unknown driver": (UNKNOWN_DRIVER_URL, "ledger.url: unknown postgresql driver 'nodriver'"),
    "unknown dialect": (f"foo://mqi:{DB_PASSWORD}@db.example/mqi", "the ledger supports SQLite and PostgreSQL, not 'foo'"),
    "asynchronous driver": (f"postgresql+asyncpg://mqi:{DB_PASSWORD}@db.example/mqi",
                            "the ledger needs a synchronous driver, not 'asyncpg'"),
    "driver not installed": (f"postgresql+pg8000://mqi:{DB_PASSWORD}@db.example/mqi",
                             "needs the database driver 'pg8000', which cannot be loaded (No module named 'pg8000')"),
}


@pytest.mark.parametrize("url,expected", BAD_LEDGER_URLS.values(), ids=BAD_LEDGER_URLS.keys())
def test_ledger_url_with_an_unusable_driver_is_named_by_config_check(tmp_path, user_shell, url, expected):
    code, output = config_check(tmp_path, f"ledger: {{url: '{url}'}}\n")
    assert code == 2
    assert expected in output
    assert DB_PASSWORD not in output and "@db.example/mqi" in output  # shown, password masked


def test_missing_postgres_driver_names_the_pip_extra(tmp_path, user_shell, monkeypatch):
    # psycopg is installed here; a None in sys.modules makes `import psycopg` fail as if it were not.
    monkeypatch.setitem(sys.modules, "psycopg", None)
    code, output = config_check(tmp_path, f"ledger: {{url: 'postgresql://mqi:{DB_PASSWORD}@db.example/mqi'}}\n")
    assert code == 2
    assert "needs the database driver 'psycopg', which cannot be loaded" in output
    assert "pip install 'mqi-communicator[postgres]'" in output
    assert DB_PASSWORD not in output


def test_sqlite_ledger_under_a_file_is_named_by_config_check(tmp_path, user_shell):
    (tmp_path / "data").write_text("a file\n")
    code, output = config_check(tmp_path, f"ledger: {{url: 'sqlite:///{tmp_path}/data/mqi.db'}}\n")
    assert code == 2
    assert f"ledger.url: the SQLite ledger cannot be created: '{tmp_path}/data' exists but is not a folder" in output

    # the same when the file appears after the settings were read
    with pytest.raises(LedgerError, match=f"cannot create the folder of the SQLite ledger {tmp_path}/data/mqi.db"):
        Ledger.open(f"sqlite:///{tmp_path}/data/mqi.db")


@pytest.mark.parametrize("source", ["file", "environment"])
def test_status_with_an_unknown_ledger_driver_is_a_clear_error(tmp_path, source):
    if source == "file":
        write_yaml(tmp_path, f"ledger: {{url: '{UNKNOWN_DRIVER_URL}'}}\n")
        result, where = mqi("status", cwd=tmp_path), "ledger.url"
    else:
        result, where = mqi("status", cwd=tmp_path, MQI_LEDGER__URL=UNKNOWN_DRIVER_URL), "MQI_LEDGER__URL"
    assert result.returncode == 2
    assert f"{where}: unknown postgresql driver 'nodriver'" in result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert DB_PASSWORD not in result.stdout + result.stderr


BAD_VARIABLES = {
    "ledger URL": ({"MQI_LEDGER__URL": UNKNOWN_DRIVER_URL}, "MQI_LEDGER__URL: unknown postgresql driver 'nodriver'"),
    "lower-case name": ({"mqi_ledger__url": UNKNOWN_DRIVER_URL}, "mqi_ledger__url: unknown postgresql driver"),
    "number": ({"MQI_CASE__POLL_SECONDS": "fast"}, "MQI_CASE__POLL_SECONDS: Input should be a valid number"),
    "unknown key": ({"MQI_CASE__COLOUR": "red"}, "MQI_CASE__COLOUR: unknown key"),
    "key in a JSON section": ({"MQI_LEDGER": json.dumps({"url": UNKNOWN_DRIVER_URL})},
                              "MQI_LEDGER: url: unknown postgresql driver 'nodriver'"),
    "not JSON": ({"MQI_HOSTS": "gpu1"}, "MQI_HOSTS: not valid JSON"),
}


@pytest.mark.parametrize("variables,expected", BAD_VARIABLES.values(), ids=BAD_VARIABLES.keys())
def test_a_bad_environment_variable_is_named_as_the_source(tmp_path, user_shell, variables, expected):
    # The file is fine and even sets the same key: the variable wins, so the variable is at fault.
    code, output = config_check(
        tmp_path, "ledger: {url: 'sqlite:///./mqi.db'}\ncase: {poll_seconds: 2}\n", **variables
    )
    assert code == 2
    assert expected in output
    assert "mqi.yaml" not in output  # not reported as a problem of the file
    assert DB_PASSWORD not in output


def test_file_and_environment_problems_are_each_named_where_they_are(tmp_path, user_shell):
    code, output = config_check(
        tmp_path, "case: {poll_seconds: fast}\n",
        MQI_CASE__TIMEOUT_HOURS="2", MQI_LEDGER__URL=UNKNOWN_DRIVER_URL,
    )
    assert code == 2
    assert "mqi.yaml and the MQI_ environment variables: 2 problem(s):" in output
    assert "- case.poll_seconds: Input should be a valid number" in output  # the file's, beside a variable
    assert "- MQI_LEDGER__URL: unknown postgresql driver 'nodriver'" in output
