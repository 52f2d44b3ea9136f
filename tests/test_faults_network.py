"""Host, network, queue and disk faults while cases run, end to end (real sshd, pueue stand-in).

Every test ends by checking what an operator relies on: the right final state, one remote
task per attempt, and results that are either complete and verified or absent.
"""

from __future__ import annotations

import logging
import re
import shlex
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from itertools import pairwise
from pathlib import Path

import pytest

from flows.reconcile import adopt_unknown_tasks, report_hosts
from mqi.host_health import host_health
from mqi.host_report import check_host, host_reports, status_text
from mqi.ledger.states import AttemptResult, CaseState, FailureCategory
from tests.support.cases import (
    case_state,
    make_case,
    run_case,
    settings_for,
    ssh_host,
    start,
    wait_for,
)
from tests.support.faults import (
    partial_bytes,
    small_filesystem,
    sqlite_write_lock,
    staging_leftovers,
    tasks_labelled,
    tree_digest,
)
from tests.test_process_case import prefect_events

pytestmark = pytest.mark.usefixtures("prefect_server")

OUTPUT = "mkdir -p output && cp RTPLAN.dcm output/dose.dcm"
BIG = 48 * 2**20


def run_in_background(folder: Path) -> tuple[threading.Thread, dict]:
    outcome: dict = {}

    def target():
        try:
            outcome["state"] = run_case(folder)
        except BaseException as exc:  # noqa: BLE001 (reported by the test)
            outcome["error"] = exc

    runner = threading.Thread(target=target, daemon=True)
    runner.start()
    return runner, outcome


def assert_completed_once(site, fake_pueue, folder: Path) -> None:
    case = site.ledger.find_case(str(folder))
    assert case.state is CaseState.COMPLETED, f"{case.name}: {case.state} {case.failure_message}"
    [attempt] = site.ledger.attempts(case.id)
    assert tasks_labelled(fake_pueue, attempt.label) == (1, 1)
    assert tree_digest(Path(case.results_path)) == tree_digest(Path(attempt.remote_dir) / "output")


def test_cases_waiting_through_a_20_second_ssh_outage_all_complete(tmp_path, sshd, fake_pueue):
    fake_pueue.add_group("gpu", 3)
    site = start(settings_for(tmp_path, [ssh_host(tmp_path, sshd, fake_pueue, groups=({"name": "gpu", "slots": 3},))],
                              command="sleep 15; " + OUTPUT))
    folders = [make_case(tmp_path, f"outage-{n}") for n in range(3)]
    with ThreadPoolExecutor(max_workers=3) as pool:
        states = [pool.submit(run_case, folder) for folder in folders]
        wait_for(lambda: all(case_state(site, f) in (CaseState.QUEUED, CaseState.RUNNING) for f in folders),
                 timeout=90, what="all cases to be submitted")
        sshd.stop()
        try:
            time.sleep(20)
        finally:
            sshd.start()
        assert [s.result(timeout=180) for s in states] == ["completed"] * 3
    for folder in folders:
        assert_completed_once(site, fake_pueue, folder)


def test_a_host_key_changed_under_waiting_cases_is_announced_once_and_waited_out(tmp_path, sshd_factory, fake_pueue,
                                                                                  caplog):
    server = sshd_factory(log_level="VERBOSE")  # logs every connection: the test counts them
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(server.known_hosts_line)  # the key the operator trusted
    fake_pueue.add_group("gpu", 2)
    host = ssh_host(tmp_path, server, fake_pueue, groups=({"name": "gpu", "slots": 2},)) | {
        "known_hosts": str(known_hosts)}
    release = tmp_path / "release"  # the engines run until the test creates it
    engine = f"while [ ! -e {shlex.quote(str(release))} ]; do sleep 0.1; done; {OUTPUT}"
    site = start(settings_for(tmp_path, [host], command=engine))
    waiting = [make_case(tmp_path, f"waiting-{n}") for n in range(2)]
    runs = [run_in_background(folder) for folder in waiting]
    wait_for(lambda: all(case_state(site, f) in (CaseState.QUEUED, CaseState.RUNNING) for f in waiting),
             timeout=90, what="both cases to be submitted")

    server.replace_host_key()  # the host is reinstalled under the waiting cases
    wait_for(lambda: host_health(site.settings.state_dir, host["name"]).needs_operator, timeout=60,
             what="the host to be marked refused")
    [looked] = host_reports(site, timeout=30)  # the operator looks (`mqi hosts`): refused again, not news
    assert status_text(looked).startswith("REFUSED, needs an operator: ") and "has CHANGED" in looked.reason
    caplog.set_level(logging.WARNING, logger="mqi.casework")
    late = make_case(tmp_path, "late")
    runs.append(run_in_background(late))  # placed while the host is refused: it waits for placement
    wait_for(lambda: case_state(site, late) is CaseState.PENDING, what="the late case to be registered")
    connections = server.connections_seen()
    # What reconcile does every minute asks nothing of the host either.
    assert adopt_unknown_tasks.fn() == [f"host {host['name']}: not checked: refused, needs an operator (see `mqi hosts`)"]
    assert "has CHANGED" in report_hosts.fn()[0]
    wait_for(lambda: len(_placement_waits(caplog, "late")) >= 4, what="the late case to try placement 4 times")
    release.touch()  # meanwhile the cases polled several times, without asking the host
    wait_for(lambda: all("Done" in task["status"] for task in fake_pueue.status()["tasks"].values()), timeout=60,
             what="the tasks to end on the host")
    assert server.connections_seen() == connections, "the refused host was asked again before its next check"
    assert {case_state(site, f) for f in waiting} <= {CaseState.QUEUED, CaseState.RUNNING}  # waiting, not failed
    assert case_state(site, late) is CaseState.PENDING and "has CHANGED" in _placement_waits(caplog, "late")[0]
    assert all(thread.is_alive() for thread, _ in runs)

    # The operator does what the message says: the old key removed, the new one accepted, `mqi hosts`.
    reason = host_health(site.settings.state_dir, host["name"]).reason
    [remove] = [command for command in re.findall(r"`([^`]+)`", reason) if command.startswith("ssh-keygen -R ")]
    subprocess.run(shlex.split(remove), check=True, capture_output=True)
    with known_hosts.open("a") as file:
        file.write(server.known_hosts_line)
    [report] = host_reports(site, timeout=30)
    assert report.reachable, report.reason

    for thread, outcome in runs:
        thread.join(180)
        assert outcome.get("state") == "completed", outcome
    for folder in [*waiting, late]:
        assert_completed_once(site, fake_pueue, folder)
    refused = wait_for(lambda: _refused_then_reachable(f"mqi.host.{host['name']}"), what="the host's events")
    assert len(refused) == 1, refused  # one announcement, not one per poll or per case
    assert "has CHANGED" in refused[0].payload["reason"] and refused[0].payload["needs_operator"] is True


def _placement_waits(caplog, case_name: str) -> list[str]:
    """What the case's placement said each time it found no usable host."""
    return [r.getMessage() for r in caplog.records if f"no usable group for case {case_name} now" in r.getMessage()]


def _refused_then_reachable(resource_id: str) -> list | None:
    """The `mqi.host.refused` events, once a `mqi.host.reachable` event has followed them."""
    events = sorted(prefect_events(resource_id), key=lambda event: event.occurred)
    names = [event.event for event in events]
    if "mqi.host.refused" not in names or "mqi.host.reachable" not in names[names.index("mqi.host.refused"):]:
        return None
    return [event for event in events if event.event == "mqi.host.refused"]


@pytest.mark.parametrize("direction", ["upload", "download"])
def test_connection_cut_mid_transfer_is_retried_and_verified(tmp_path, sshd, fake_pueue, direction):
    size = BIG if direction == "download" else 1024
    host = ssh_host(tmp_path, sshd, fake_pueue)
    site = start(settings_for(tmp_path, [host], command=f"{OUTPUT} && head -c {size} /dev/urandom > output/dose.raw"))
    folder = make_case(tmp_path, f"cut-{direction}")
    if direction == "upload":
        (folder / "machine.log").write_bytes(b"\x5a" * BIG)
    runner, outcome = run_in_background(folder)
    wait_for(lambda: case_state(site, folder) is not None, what="the case to be registered")
    case = site.ledger.find_case(str(folder))
    staging = (Path(host["workdir"]), case.uid) if direction == "upload" else (site.settings.results_dir, folder.name)
    wait_for(lambda: partial_bytes(*staging) > 0, timeout=60, what=f"the {direction} to be under way")
    assert sshd.kill_sessions() > 0

    runner.join(180)
    assert outcome.get("state") == "completed", outcome
    assert_completed_once(site, fake_pueue, folder)
    if direction == "upload":
        assert _uploaded_intact(folder, Path(host["workdir"]) / case.uid)
    moves = [(e.from_state, e.to_state, e.message) for e in site.ledger.events(case.id)]
    if direction == "upload":  # the cut was recorded: back to pending, then a new upload
        assert any(to is CaseState.PENDING and "upload interrupted" in message for _, to, message in moves)
    assert staging_leftovers(site.settings.results_dir) == []


def _uploaded_intact(folder: Path, remote: Path) -> bool:
    remote_inputs = {k: v for k, v in tree_digest(remote).items() if not k.startswith("output/")}
    return remote_inputs == tree_digest(folder)


@pytest.mark.parametrize("restart", ["crash-v4", "graceful-v3"])
def test_pueue_daemon_restart_needs_no_person(tmp_path, sshd, fake_pueue, restart):
    """`queue_ahead: 1`: one case runs, the next waits in pueue behind it; the daemon restarts
    (a crash, or a graceful stop as at a reboot), killing the first and pausing the group. With
    only what the main job does (reconcile, on its schedule) every case completes, the killed
    one as a second attempt, and nothing announces a person's pause."""
    how, fmt = restart.split("-")
    fake_pueue.set_format(fmt)
    gate = tmp_path / "restarted"  # the engine runs for a minute until the daemon has restarted
    host = ssh_host(tmp_path, sshd, fake_pueue, groups=({"name": "default", "slots": 1, "queue_ahead": 1},))
    host["pueue_pid_file"] = str(fake_pueue.store.pid_file)
    site = start(settings_for(tmp_path, [host], command=f"[ -e {gate} ] || sleep 60; {OUTPUT}"))
    first, second = make_case(tmp_path, "killed-by-restart"), make_case(tmp_path, "queued-behind")
    first_runner, first_outcome = run_in_background(first)
    wait_for(lambda: case_state(site, first) is CaseState.RUNNING, timeout=60, what="the first case to run")
    second_runner, second_outcome = run_in_background(second)
    wait_for(lambda: case_state(site, second) is CaseState.QUEUED, timeout=60, what="the second case to queue")

    fake_pueue.restart_daemon(graceful=how == "graceful")
    gate.touch()
    with reconciling_on_a_schedule() as reconcile_notes:
        first_runner.join(120)
        second_runner.join(60)

    assert (first_outcome.get("state"), second_outcome.get("state")) == ("completed", "completed"), (
        first_outcome, second_outcome)
    killed = site.ledger.find_case(str(first))
    attempts = site.ledger.attempts(killed.id)
    assert [a.result for a in attempts] == [AttemptResult.KILLED, AttemptResult.SUCCESS]
    moves = [(e.to_state, e.message) for e in site.ledger.events(killed.id)]
    [failed_at] = [n for n, (state, _) in enumerate(moves) if state is CaseState.FAILED]
    assert "killed by a restart of the pueue daemon" in moves[failed_at][1]
    assert moves[failed_at + 1][0] is CaseState.PENDING
    assert moves[failed_at + 1][1].startswith("automatic retry after infrastructure (attempt 2 of 3)")
    for attempt in attempts:
        assert tasks_labelled(fake_pueue, attempt.label)[0] == 1
    assert tree_digest(Path(killed.results_path)) == tree_digest(Path(attempts[1].remote_dir) / "output")
    assert_completed_once(site, fake_pueue, second)
    assert any("started again, paused by a pueue daemon restart" in note for note in reconcile_notes)
    assert fake_pueue.status()["groups"]["default"]["status"] == "Running"
    assert "mqi.group.paused" not in {e.event for e in group_events(site, "default")}


def test_a_group_paused_by_a_person_is_left_paused_shown_with_its_cause_and_announced_once(
        tmp_path, sshd, fake_pueue):
    host = ssh_host(tmp_path, sshd, fake_pueue)
    host["pueue_pid_file"] = str(fake_pueue.store.pid_file)
    site = start(settings_for(tmp_path, [host], command=OUTPUT))
    check_host(site, site.settings.hosts[0], timeout=15)  # the job's polls saw the group running
    fake_pueue.pause_group("default")
    folder = make_case(tmp_path, "waits-for-a-person")
    runner, outcome = run_in_background(folder)
    wait_for(lambda: case_state(site, folder) is CaseState.QUEUED, timeout=60, what="the case to queue")

    from flows.reconcile import reconcile
    notes = reconcile() + reconcile()

    assert fake_pueue.status()["groups"]["default"]["status"] == "Paused"
    assert case_state(site, folder) is CaseState.QUEUED
    assert sum("left paused with 1 case(s) waiting" in note for note in notes) == 2, notes
    [group] = check_host(site, site.settings.hosts[0], timeout=15).groups  # what `mqi hosts` shows
    assert group.on_host == "paused" and group.pause_cause.startswith("paused on the host, ")
    announced = [e for e in group_events(site, "default", until_sentinel=True) if e.event == "mqi.group.paused"]
    assert len(announced) == 1 and announced[0].payload["cause"] in group.pause_cause

    fake_pueue.start_group("default")  # the person's decision
    runner.join(60)
    assert outcome.get("state") == "completed"


def test_a_task_killed_by_a_person_is_an_infrastructure_failure_not_retried(tmp_path, sshd, fake_pueue):
    """`pueue kill` under a running daemon is somebody's decision: the case fails, no new attempt
    (retry.max_attempts, default 1), and the message says it was not a restart."""
    host = ssh_host(tmp_path, sshd, fake_pueue)
    host["pueue_pid_file"] = str(fake_pueue.store.pid_file)
    site = start(settings_for(tmp_path, [host], command="sleep 60"))
    folder = make_case(tmp_path, "killed-by-a-person")
    runner, outcome = run_in_background(folder)
    wait_for(lambda: case_state(site, folder) is CaseState.RUNNING, timeout=60, what="the case to run")
    [attempt] = site.ledger.attempts(site.ledger.find_case(str(folder)).id)
    assert fake_pueue.run("kill", str(attempt.task_id)).returncode == 0

    runner.join(60)
    case = site.ledger.find_case(str(folder))
    assert outcome.get("state") == "failed" and case.failure_category is FailureCategory.INFRASTRUCTURE
    assert [a.result for a in site.ledger.attempts(case.id)] == [AttemptResult.KILLED]
    assert case.failure_message.startswith("the task was killed on the host, not by a pueue daemon restart: ")
    assert "under the daemon running since" in case.failure_message


@contextmanager
def reconciling_on_a_schedule(interval: float = 1.0) -> Iterator[list[str]]:
    """The main job's reconcile, run every `interval` seconds while the block runs."""
    from flows.reconcile import reconcile

    notes: list[str] = []
    stop = threading.Event()

    def loop():
        while not stop.wait(interval):
            notes.extend(reconcile())

    runner = threading.Thread(target=loop, daemon=True)
    runner.start()
    try:
        yield notes
    finally:
        stop.set()
        runner.join(60)


def group_events(site, group: str, *, until_sentinel: bool = False) -> list:
    """The Prefect events about one GPU group of the site's host. `until_sentinel`: first send
    one more event about it and wait until the server has it, so earlier ones are in too."""
    from prefect import get_client
    from prefect.events import emit_event
    from prefect.events.filters import EventFilter, EventResourceFilter
    from prefect.events.worker import EventsWorker

    resource = f"mqi.group.{site.settings.hosts[0].name}.{group}"

    def read() -> list:
        with get_client(sync_client=True) as client:
            return client.read_events(EventFilter(resource=EventResourceFilter(id=[resource])), limit=50).events

    if until_sentinel:
        emit_event("mqi.test.sentinel", resource={"prefect.resource.id": resource})
    EventsWorker.drain_all(timeout=10, at_exit=False)
    if until_sentinel:
        wait_for(lambda: any(e.event == "mqi.test.sentinel" for e in read()), what="the events to be stored")
    return read()


def _clean_when_done(fake_pueue) -> None:
    """`pueue clean` the moment our task is done, before the case's next poll sees it."""
    wait_for(lambda: _any_done(fake_pueue), timeout=60, what="the task to finish")
    fake_pueue.clean()


def _any_done(fake_pueue) -> bool:
    return any("Done" in t["status"] for t in fake_pueue.status()["tasks"].values())


def test_task_cleaned_before_seen_done_is_decided_from_its_results_and_a_reused_id_is_not_ours(
        tmp_path, sshd, fake_pueue):
    site = start(settings_for(tmp_path, [ssh_host(tmp_path, sshd, fake_pueue)], command=f"sleep 1; {OUTPUT}",
                              poll_seconds=4))
    folder = make_case(tmp_path, "cleaned-case")
    runner, outcome = run_in_background(folder)
    _clean_when_done(fake_pueue)
    fake_pueue.run("add", "--group", "default", "--label", "someone-else", "--", "sleep 30")  # takes our id 0
    runner.join(60)

    case = site.ledger.find_case(str(folder))
    [attempt] = site.ledger.attempts(case.id)
    assert outcome.get("state") == "completed" and attempt.result is AttemptResult.SUCCESS
    [stranger] = fake_pueue.status()["tasks"].values()
    assert stranger["id"] == attempt.task_id and stranger["label"] == "someone-else"
    assert "Running" in stranger["status"], "the unrelated task with our old id was touched"
    assert (Path(case.results_path) / "dose.dcm").read_bytes() == b"DICM plan of cleaned-case"


def test_task_cleaned_without_results_is_lost_with_a_clear_reason(tmp_path, sshd, fake_pueue):
    site = start(settings_for(tmp_path, [ssh_host(tmp_path, sshd, fake_pueue)], command="sleep 1", poll_seconds=4))
    folder = make_case(tmp_path, "lost-case")
    runner, outcome = run_in_background(folder)
    _clean_when_done(fake_pueue)
    runner.join(60)

    case = site.ledger.find_case(str(folder))
    assert outcome.get("state") == "failed" and case.failure_category is FailureCategory.LOST
    assert "disappeared from the queue" in case.failure_message and "no results" in case.failure_message
    assert site.ledger.attempts(case.id)[0].result is AttemptResult.LOST
    assert not (site.settings.results_dir / folder.name).exists()


def test_ledger_locked_by_another_process_delays_but_loses_no_step(tmp_path, sshd, fake_pueue):
    site = start(settings_for(tmp_path, [ssh_host(tmp_path, sshd, fake_pueue)], command="sleep 1; " + OUTPUT))
    folder = make_case(tmp_path, "locked-case")
    runner, outcome = run_in_background(folder)
    wait_for(lambda: case_state(site, folder) in (CaseState.QUEUED, CaseState.RUNNING), timeout=60, what="submission")
    with sqlite_write_lock(tmp_path / "mqi.db", seconds=5):
        time.sleep(5)
    runner.join(90)

    assert outcome.get("state") == "completed", outcome
    assert_completed_once(site, fake_pueue, folder)
    events = site.ledger.events(site.ledger.find_case(str(folder)).id)
    chain = [(e.from_state, e.to_state) for e in events]
    assert all(before[1] is after[0] for before, after in pairwise(chain)), f"a step went unrecorded: {chain}"


@pytest.fixture
def tiny_results_disk(tmp_path):
    with small_filesystem(tmp_path / "results", "2m") as mount_point:
        yield mount_point


def test_local_disk_full_while_downloading_never_completes_the_case(tmp_path, sshd, fake_pueue, tiny_results_disk):
    site = start(settings_for(tmp_path, [ssh_host(tmp_path, sshd, fake_pueue)],
                              command=f"{OUTPUT} && head -c {8 * 2**20} /dev/urandom > output/dose.raw"))
    folder = make_case(tmp_path, "full-disk-case")

    with pytest.raises(OSError, match="No space left on device"):
        run_case(folder)

    case = site.ledger.find_case(str(folder))
    assert case.state is CaseState.DOWNLOADING and case.results_path is None
    assert site.ledger.live_attempt(case.id) is not None, "the results are still on the host: the attempt stays live"
    assert list(tiny_results_disk.iterdir()) == [], "a partial download was left behind"
