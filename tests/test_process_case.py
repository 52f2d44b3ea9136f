"""The process-case flow end to end: a real Prefect server, the real sshd, the pueue stand-in."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from mqi.ledger.states import AttemptResult, CaseState, FailureCategory
from mqi.ledger.store import CaseNotFound
from tests.support.cases import (
    OUTPUT,
    case_state,
    local_host,
    make_case,
    pid_alive,
    run_case,
    settings_for,
    ssh_host,
    start,
    unique_host,
    wait_for,
)

pytestmark = pytest.mark.usefixtures("prefect_server")


def test_success_on_the_local_queue_keeps_where_it_ran(tmp_path):
    site = start(settings_for(tmp_path, [local_host(tmp_path)],
                              command="echo 'Generating particles for (1 of 2 batches)'; " + OUTPUT))
    folder = make_case(tmp_path, "case-a")

    assert run_case(folder) == "completed"

    case = site.ledger.find_case(str(folder))
    assert (tmp_path / "results" / "case-a" / "dose.dcm").read_bytes() == b"DICM plan of case-a"
    assert case.results_path == str(tmp_path / "results" / "case-a")
    [attempt] = site.ledger.attempts(case.id)
    assert (attempt.host, attempt.group, attempt.result) == (site.settings.hosts[0].name, "gpu0", AttemptResult.SUCCESS)
    assert attempt.task_id is not None and attempt.label == f"mqi-{case.uid}-a1"
    moves = [(e.from_state, e.to_state) for e in site.ledger.events(case.id)]
    assert moves[-1] == (CaseState.DOWNLOADING, CaseState.COMPLETED)
    assert (CaseState.UPLOADING, CaseState.QUEUED) in moves


def test_success_over_ssh_and_pueue_with_devices(tmp_path, sshd, fake_pueue):
    fake_pueue.add_group("gpu1", 1)
    host = ssh_host(tmp_path, sshd, fake_pueue, groups=({"name": "gpu1", "slots": 1, "devices": "1"},))
    site = start(settings_for(tmp_path, [host], command="echo $CUDA_VISIBLE_DEVICES > output.cuda; " + OUTPUT
                              + " && mv output.cuda output/"))
    folder = make_case(tmp_path, "case b; $(touch CANARY)")

    assert run_case(folder) == "completed"

    result = tmp_path / "results" / "case b; $(touch CANARY)"
    assert (result / "output.cuda").read_text().strip() == "1"
    [task] = fake_pueue.status()["tasks"].values()
    case = site.ledger.find_case(str(folder))
    assert task["label"] == f"mqi-{case.uid}-a1" and task["group"] == "gpu1"
    assert not list(tmp_path.rglob("CANARY")) and not Path("CANARY").exists()


def test_engine_failure_records_exit_code_and_log(tmp_path, sshd, fake_pueue):
    site = start(settings_for(tmp_path, [ssh_host(tmp_path, sshd, fake_pueue)],
                              command="echo 'dose engine: beam energy out of range' >&2; exit 3"))
    folder = make_case(tmp_path, "bad-case")

    assert run_case(folder) == "failed"

    case = site.ledger.find_case(str(folder))
    [attempt] = site.ledger.attempts(case.id)
    assert (attempt.result, attempt.exit_code) == (AttemptResult.FAILED, 3)
    assert case.failure_category is FailureCategory.ENGINE
    assert "exited with code 3" in case.failure_message
    assert "beam energy out of range" in case.failure_message
    assert not (tmp_path / "results" / "bad-case").exists()


def test_timeout_kills_the_remote_process(tmp_path, sshd, fake_pueue):
    site = start(settings_for(tmp_path, [ssh_host(tmp_path, sshd, fake_pueue)],
                              command="echo $$ > engine.pid; exec sleep 300", timeout_hours=3 / 3600))
    folder = make_case(tmp_path, "slow-case")

    assert run_case(folder) == "failed"

    case = site.ledger.find_case(str(folder))
    [attempt] = site.ledger.attempts(case.id)
    assert attempt.result is AttemptResult.TIMEOUT and case.failure_category is FailureCategory.TIMEOUT
    pid = int((tmp_path / "remote" / case.uid / "engine.pid").read_text())
    assert not pid_alive(pid), "the engine still runs on the host after the timeout"
    [task] = fake_pueue.status()["tasks"].values()
    assert task["status"]["Done"]["result"] == "Killed"


def test_host_outage_while_waiting_does_not_fail_the_case(tmp_path, sshd, fake_pueue):
    site = start(settings_for(tmp_path, [ssh_host(tmp_path, sshd, fake_pueue)], command="sleep 4; " + OUTPUT))
    folder = make_case(tmp_path, "outage-case")
    result = {}
    runner = threading.Thread(target=lambda: result.setdefault("state", run_case(folder)))
    runner.start()
    wait_for(lambda: case_state(site, folder) in (CaseState.QUEUED, CaseState.RUNNING), what="the case to be submitted")
    sshd.stop()
    # Longer than the transport's own reconnect attempts (about 7 s), so the wait sees it.
    time.sleep(12)
    sshd.start()
    runner.join(120)
    assert result.get("state") == "completed"
    assert len(fake_pueue.status()["tasks"]) == 1
    host = f"mqi.host.{site.settings.hosts[0].name}"  # automations can react to a host coming back
    wait_for(lambda: {"mqi.host.unreachable", "mqi.host.reachable"} <= {e.event for e in prefect_events(host)},
             what="the host's down and up events")


def prefect_events(resource_id: str) -> list:
    from prefect import get_client
    from prefect.events.filters import EventFilter, EventResourceFilter

    with get_client(sync_client=True) as client:
        return client.read_events(EventFilter(resource=EventResourceFilter(id=[resource_id])), limit=50).events


def test_flow_killed_after_submission_is_resumed_with_one_remote_task(tmp_path, sshd, fake_pueue):
    settings = settings_for(tmp_path, [ssh_host(tmp_path, sshd, fake_pueue)], command="sleep 3; " + OUTPUT)
    config = tmp_path / "mqi.yaml"
    config.write_text(yaml.safe_dump(settings.masked() | {"ledger": {"url": settings.ledger.url.get_secret_value()}}))
    site = start(settings)
    folder = make_case(tmp_path, "crash-case")
    child = subprocess.Popen([sys.executable, "-m", "mqi.cli", "--config", str(config), "submit", str(folder)],
                             cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=open(tmp_path / "child.log", "wb"),
                             start_new_session=True)
    try:
        wait_for(lambda: _task_id(site, folder), timeout=60, what="the task to be submitted")
    finally:
        os.killpg(child.pid, signal.SIGKILL)
        child.wait()

    from mqi import casework

    case = site.ledger.find_case(str(folder))
    assert [c.id for c in casework.orphaned_cases(site, live_flow_runs=set())] == [case.id]
    assert run_case(folder) == "completed"
    assert len(fake_pueue.status()["tasks"]) == 1
    assert len(site.ledger.attempts(case.id)) == 1


def _task_id(site, folder):
    try:
        case = site.ledger.find_case(str(folder))
    except CaseNotFound:
        return None
    attempt = site.ledger.live_attempt(case.id)
    return attempt is not None and attempt.task_id is not None  # pueue ids start at 0


def test_two_single_slot_groups_never_run_more_than_two(tmp_path, sshd, fake_pueue):
    fake_pueue.add_group("gpu0", 5)  # pueue would allow more: the limit is ours
    fake_pueue.add_group("gpu1", 5)
    groups = ({"name": "gpu0", "slots": 1}, {"name": "gpu1", "slots": 1})
    start(settings_for(tmp_path, [ssh_host(tmp_path, sshd, fake_pueue, groups=groups)],
                              command="sleep 1; " + OUTPUT))
    folders = [make_case(tmp_path, f"case-{n}") for n in range(5)]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=5) as pool:
        states = list(pool.map(run_case, folders))

    assert states == ["completed"] * 5
    assert fake_pueue.max_concurrent("gpu0") == 1 and fake_pueue.max_concurrent("gpu1") == 1
    history = fake_pueue.task_history()
    assert {r["group"] for r in history} == {"gpu0", "gpu1"}  # both GPUs were used
    assert _max_overlap(history) <= 2


def _max_overlap(history: list[dict]) -> int:
    running, peak = 0, 0
    for record in sorted(history, key=lambda r: (r["time"], r["event"] == "start")):
        running += 1 if record["event"] == "start" else -1
        peak = max(peak, running)
    return peak


def test_retry_is_a_new_attempt_and_history_is_kept(tmp_path, sshd, fake_pueue):
    site = start(settings_for(tmp_path, [ssh_host(tmp_path, sshd, fake_pueue)],
                              command="test -e FIXED || exit 4; " + OUTPUT))
    folder = make_case(tmp_path, "retry-case")
    assert run_case(folder) == "failed"
    case = site.ledger.find_case(str(folder))
    [first] = site.ledger.attempts(case.id)

    (folder / "FIXED").write_text("")
    site.ledger.transition(case.id, CaseState.PENDING, actor="test", message="retry")
    assert run_case(folder) == "completed"

    old, new = site.ledger.attempts(case.id)
    assert (old.host, old.group, old.task_id, old.result, old.exit_code) == (
        first.host, first.group, first.task_id, AttemptResult.FAILED, 4)
    assert new.number == 2 and new.label.endswith("-a2") and new.result is AttemptResult.SUCCESS


def test_cancel_kills_the_remote_task(tmp_path, sshd, fake_pueue):
    from mqi import casework

    site = start(settings_for(tmp_path, [ssh_host(tmp_path, sshd, fake_pueue)],
                              command="echo $$ > engine.pid; exec sleep 300"))
    folder = make_case(tmp_path, "cancel-case")
    result = {}
    runner = threading.Thread(target=lambda: result.setdefault("state", run_case(folder)))
    runner.start()
    case = wait_for(lambda: _running(site, folder), what="the case to run")
    pid_file = tmp_path / "remote" / case.uid / "engine.pid"
    wait_for(pid_file.exists, what="the engine to start")

    assert casework.cancel(site, case, "test", "cancelled by the physicist")
    runner.join(60)

    case = site.ledger.find_case(str(folder))
    assert case.state is CaseState.CANCELLED
    # The run saw its task end while the kill was being confirmed: it reports either.
    assert result["state"] in ("cancelled", "killing")
    assert site.ledger.attempts(case.id)[0].result is AttemptResult.CANCELLED
    assert not pid_alive(int(pid_file.read_text()))


def _running(site, folder):
    if case_state(site, folder) is CaseState.RUNNING:
        return site.ledger.find_case(str(folder))
    return None


def test_engine_failure_is_retried_as_a_new_attempt_when_the_policy_allows(tmp_path, sshd, fake_pueue):
    runs = tmp_path / "engine-runs"
    settings = settings_for(tmp_path, [ssh_host(tmp_path, sshd, fake_pueue)],
                            command=f"echo run >> {runs}; test $(wc -l < {runs}) -ge 2 || exit 5; " + OUTPUT)
    settings.retry.max_attempts = 2
    site = start(settings)
    folder = make_case(tmp_path, "flaky-case")

    assert run_case(folder) == "completed"

    case = site.ledger.find_case(str(folder))
    first, second = site.ledger.attempts(case.id)
    assert (first.result, first.exit_code, second.result) == (AttemptResult.FAILED, 5, AttemptResult.SUCCESS)
    assert any("automatic retry after engine" in e.message for e in site.ledger.events(case.id))


def test_no_retry_beyond_max_attempts_and_never_for_input_errors(tmp_path, sshd, fake_pueue):
    settings = settings_for(tmp_path, [ssh_host(tmp_path, sshd, fake_pueue)], command="exit 6")
    settings.retry.max_attempts = 2
    site = start(settings)
    failing = make_case(tmp_path, "always-fails")
    broken = make_case(tmp_path, "escaping-link")
    (broken / "passwd").symlink_to("/etc/passwd")

    assert run_case(failing) == "failed"
    assert run_case(broken) == "failed"

    assert [a.exit_code for a in site.ledger.attempts(site.ledger.find_case(str(failing)).id)] == [6, 6]
    bad = site.ledger.find_case(str(broken))
    assert bad.failure_category is FailureCategory.INPUT and "passwd" in bad.failure_message
    assert site.ledger.attempts(bad.id) == []  # nothing was ever submitted for it


def test_every_state_change_is_a_prefect_event_with_host_and_group(tmp_path):
    site = start(settings_for(tmp_path, [local_host(tmp_path)], command=OUTPUT))
    folder = make_case(tmp_path, "event-case")
    assert run_case(folder) == "completed"
    case = site.ledger.find_case(str(folder))

    def events():
        return prefect_events(f"mqi.case.{case.uid}")

    wanted = [f"mqi.case.{e.to_state.value}" for e in site.ledger.events(case.id) if e.from_state is not None]
    found = wait_for(lambda: (lambda got: got if set(wanted) <= {e.event for e in got} else None)(events()),
                     what="the case's events")
    completed = next(e for e in found if e.event == "mqi.case.completed")
    roles = {r.role: r.id for r in completed.related}  # Prefect adds the flow and task runs
    assert (roles["host"], roles["gpu-group"]) == (f"mqi.host.{site.settings.hosts[0].name}",
                                                   f"mqi.group.{site.settings.hosts[0].name}.gpu0")


def test_progress_from_the_engine_log_reaches_the_ledger_while_it_runs(tmp_path):
    site = start(settings_for(tmp_path, [local_host(tmp_path)],
                              command="echo 'Generating particles for (1 of 4 batches)'; sleep 12; " + OUTPUT))
    folder = make_case(tmp_path, "progress-case")
    result = {}
    runner = threading.Thread(target=lambda: result.setdefault("state", run_case(folder)))
    runner.start()

    wait_for(lambda: case_state(site, folder) is CaseState.RUNNING and site.ledger.find_case(str(folder)).progress == 25,
             timeout=30, what="25 % progress while the engine runs")
    runner.join(60)
    assert result["state"] == "completed" and site.ledger.find_case(str(folder)).progress == 100


def test_a_stopped_host_is_skipped_and_cases_run_on_the_other(tmp_path, sshd, sshd_factory, fake_pueue):
    from tests.support.pueue_fixtures import install_fake_pueue

    down_server = sshd_factory()
    down_pueue = install_fake_pueue(tmp_path / "down-pueue")
    down_pueue.start_daemon()
    try:
        live = ssh_host(tmp_path, sshd, fake_pueue)
        down = ssh_host(tmp_path, down_server, down_pueue) | {"name": unique_host(tmp_path, "down"),
                                                              "connect_timeout": 2}
        site = start(settings_for(tmp_path, [down, live], command="sleep 1; " + OUTPUT))
        down_server.stop()
        # The down host is found out once (a failed status poll marks it), then skipped.
        from mqi.transport.base import HostUnreachable
        with pytest.raises(HostUnreachable):
            site.status(down["name"]).snapshot()
        folders = [make_case(tmp_path, f"two-hosts-{n}") for n in range(3)]
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=3) as pool:
            assert list(pool.map(run_case, folders)) == ["completed"] * 3
        hosts = {site.ledger.attempts(site.ledger.find_case(str(f)).id)[0].host for f in folders}
        assert hosts == {live["name"]}
        assert down_pueue.status()["tasks"] == {}
    finally:
        down_pueue.stop_daemon()
        down_pueue.kill_leftover_tasks()
        down_server.stop()


def test_a_case_pinned_to_a_down_host_waits_for_it(tmp_path, sshd, fake_pueue):
    from mqi.transport.base import HostUnreachable

    host = ssh_host(tmp_path, sshd, fake_pueue) | {"connect_timeout": 2}
    site = start(settings_for(tmp_path, [host], command=OUTPUT))
    folder = make_case(tmp_path, "pinned-case")
    result = {}
    runner = threading.Thread(target=lambda: result.setdefault("state", run_case(folder, host=host["name"])))
    sshd.stop()
    try:
        with pytest.raises(HostUnreachable):  # the host is found down once, then waited for
            site.status(host["name"]).snapshot()
        runner.start()
        time.sleep(3)
        assert runner.is_alive() and case_state(site, folder) is CaseState.PENDING  # waiting, not failed
    finally:
        sshd.start()
    runner.join(180)
    assert result["state"] == "completed"


def test_queue_ahead_has_the_next_case_waiting_in_pueue_before_the_gpu_frees(tmp_path, sshd, fake_pueue):
    groups = ({"name": "default", "slots": 1, "queue_ahead": 1},)  # pueue's own parallel: 1
    # Each task runs longer than admitting the next case takes (a slot try, a `pueue add`).
    start(settings_for(tmp_path, [ssh_host(tmp_path, sshd, fake_pueue, groups=groups)],
                       command="sleep 6; " + OUTPUT))
    folders = [make_case(tmp_path, f"ahead-{n}") for n in range(3)]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=3) as pool:
        assert list(pool.map(run_case, folders)) == ["completed"] * 3

    assert fake_pueue.max_concurrent("default") == 1  # the GPU stays exclusive
    done = sorted((t["status"]["Done"] for t in fake_pueue.status()["tasks"].values()), key=lambda d: d["start"])
    for previous, following in zip(done, done[1:]):
        assert following["enqueued_at"] < previous["end"]  # queued before the GPU was free


def test_uploads_to_one_host_wait_their_turn_as_pending(tmp_path, sshd, fake_pueue):
    """While an earlier case uploads to the host, a later one stays pending with nothing sent;
    it uploads when the earlier one is done."""
    from mqi import casework

    site = start(settings_for(tmp_path, [ssh_host(tmp_path, sshd, fake_pueue)]))
    earlier, _ = site.ledger.register_case(make_case(tmp_path, "case-a"))
    later, _ = site.ledger.register_case(make_case(tmp_path, "case-b"))
    placement = casework.choose_placement(site, later)
    gate = site.upload_gate(placement.host.name)
    uploaded = []
    with gate.turn(casework.arrival_key(earlier)):  # case-a is uploading
        thread = threading.Thread(target=lambda: uploaded.append(casework.upload(site, later, placement, "test")))
        thread.start()
        time.sleep(1)
        assert site.ledger.get_case(later.id).state is CaseState.PENDING
        assert not uploaded and not (Path(placement.host.workdir) / later.uid).exists()
    thread.join(30)

    assert uploaded == [True]
    assert site.ledger.get_case(later.id).state is CaseState.UPLOADING
    assert (Path(site.remote_case_dir(placement.host, later.uid)) / "RTPLAN.dcm").exists()
