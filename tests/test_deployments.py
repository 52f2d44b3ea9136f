"""prefect.yaml deployed to a fresh server, run by a real process worker, fed by scan-inbox."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mqi.ledger.states import AttemptResult, CaseState
from mqi.ledger.store import CaseNotFound
from tests.support.cases import (
    make_case,
    pid_alive,
    settings_for,
    ssh_host,
    start,
    wait_for,
)

REPO = Path(__file__).resolve().parents[1]
PREFECT = [sys.executable, "-m", "prefect"]


@pytest.fixture
def worker_site(tmp_path, prefect_server, sshd, fake_pueue):
    """Settings in a file, deployments from prefect.yaml, and a worker on the `mqi` pool."""
    settings = settings_for(tmp_path, [ssh_host(tmp_path, sshd, fake_pueue)],
                            command="echo $$ > engine.pid; if [ -e SLOW ]; then sleep 300; fi; "
                                    "mkdir -p output; cp RTPLAN.dcm output/")
    config = tmp_path / "mqi.yaml"
    config.write_text(yaml.safe_dump(settings.masked() | {"ledger": {"url": settings.ledger.url.get_secret_value()}}))
    env = os.environ | {"PREFECT_API_URL": prefect_server, "MQI_CONFIG": str(config),
                        "PREFECT_HOME": str(tmp_path / "prefect-home")}
    subprocess.run([*PREFECT, "work-pool", "create", "mqi", "--type", "process", "--overwrite"],
                   env=env, check=True, capture_output=True)
    deploy = subprocess.run([*PREFECT, "--no-prompt", "deploy", "--all"], cwd=REPO, env=env,
                            capture_output=True, text=True)
    assert deploy.returncode == 0, deploy.stdout + deploy.stderr
    pause_schedules()  # the tests call scan-inbox themselves
    (tmp_path / "worker.env").write_text(yaml.safe_dump(env))
    site = start(settings)
    site.test_worker = start_worker(tmp_path)
    yield site, tmp_path
    site.test_worker.terminate()
    try:
        site.test_worker.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(site.test_worker.pid, 9)


def start_worker(root: Path) -> subprocess.Popen:
    env = yaml.safe_load((root / "worker.env").read_text())
    return subprocess.Popen([*PREFECT, "worker", "start", "--pool", "mqi"], cwd=root, env=env,
                            stdout=open(root / "worker.log", "ab"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def pause_schedules() -> None:
    from prefect import get_client

    with get_client(sync_client=True) as client:
        for deployment in client.read_deployments():
            for schedule in client.read_deployment_schedules(deployment.id):
                client.update_deployment_schedule(deployment.id, schedule.id, active=False)


def _flow_run_state(flow_run_id):
    from prefect import get_client

    with get_client(sync_client=True) as client:
        return client.read_flow_run(flow_run_id).state


def test_process_case_through_the_api_and_a_worker(worker_site):
    from prefect.deployments import run_deployment

    site, root = worker_site
    folder = make_case(root, "api-case")

    run = run_deployment("process-case/process-case", parameters={"case": str(folder)}, timeout=240)

    assert run.state.is_completed(), run.state
    case = site.ledger.find_case(str(folder))
    assert case.state is CaseState.COMPLETED
    assert (root / "results" / "api-case" / "RTPLAN.dcm").exists()
    assert site.ledger.attempts(case.id)[0].flow_run_id == str(run.id)


def test_scan_inbox_registers_folders_and_starts_them_through_the_deployment(worker_site):
    from flows.scan_inbox import scan_inbox

    site, root = worker_site
    folders = [make_case(root, f"inbox-case-{n}") for n in range(3)]
    (root / "inbox" / "copying.partial").mkdir()  # a temporary name: never a case

    first = scan_inbox()

    assert first["registered"] == 3
    assert first["started"] == 1  # one slot: the others wait in the ledger, in arrival order
    for _ in range(6):
        if all(site.ledger.find_case(str(f)).state is CaseState.COMPLETED for f in folders):
            break
        wait_for(lambda: _no_case_in_flight(site), timeout=120, what="the running case to end")
        scan_inbox()
    assert [site.ledger.find_case(str(f)).state for f in folders] == [CaseState.COMPLETED] * 3
    assert len(site.ledger.list_cases()) == 3
    starts = sorted(site.ledger.attempts(site.ledger.find_case(str(f)).id)[0].submitted_at for f in folders)
    assert starts == [site.ledger.attempts(site.ledger.find_case(str(f)).id)[0].submitted_at for f in folders]


def _no_case_in_flight(site) -> bool:
    from tasks.launch import running_case_ids

    return not running_case_ids() and not site.ledger.cases_in_states(
        [CaseState.UPLOADING, CaseState.QUEUED, CaseState.RUNNING, CaseState.DOWNLOADING])


def test_cancelling_the_flow_run_kills_the_remote_task(worker_site):
    from prefect import get_client
    from prefect.deployments import run_deployment
    from prefect.states import Cancelling

    site, root = worker_site
    folder = make_case(root, "cancel-me")
    (folder / "SLOW").write_text("")  # the engine sleeps long enough to be cancelled while it runs
    run = run_deployment("process-case/process-case", parameters={"case": str(folder)}, timeout=0)
    case = wait_for(lambda: _running_case(site, folder), timeout=120, what="the case to run")
    pid_file = root / "remote" / case.uid / "engine.pid"
    wait_for(pid_file.exists, what="the engine to start")

    with get_client(sync_client=True) as client:
        client.set_flow_run_state(run.id, Cancelling(), force=True)

    wait_for(lambda: site.ledger.find_case(str(folder)).state is CaseState.CANCELLED, timeout=120,
             what="the case to be cancelled")
    assert site.ledger.attempts(case.id)[0].result is AttemptResult.CANCELLED
    assert not pid_alive(int(pid_file.read_text()))
    wait_for(lambda: _flow_run_state(run.id).is_cancelled(), timeout=60, what="the flow run to be cancelled")


def kill_processes_of_flow_run(flow_run_id) -> int:
    """SIGKILL every process running this flow run (the worker starts each in its own session)."""
    killed = 0
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if f"PREFECT__FLOW_RUN_ID={flow_run_id}".encode() in environ.read_bytes():
                os.kill(int(environ.parent.name), 9)
                killed += 1
        except (OSError, ValueError):
            continue
    return killed


def _running_case(site, folder):
    try:
        case = site.ledger.find_case(str(folder))
    except CaseNotFound:
        return None
    return case if case.state is CaseState.RUNNING else None


def test_reconcile_resumes_a_case_whose_worker_died_with_one_remote_task(worker_site, fake_pueue):
    from prefect.deployments import run_deployment

    from flows.reconcile import reconcile

    site, root = worker_site
    folder = make_case(root, "orphan-case")
    (folder / "SLOW").write_text("")  # keeps running while its flow run dies
    run = run_deployment("process-case/process-case", parameters={"case": str(folder)}, timeout=0)
    case = wait_for(lambda: _running_case(site, folder), timeout=120, what="the case to run")

    # The worker and its flow-run process die together, as in a reboot of the control PC.
    os.killpg(site.test_worker.pid, 9)
    site.test_worker.wait()
    assert kill_processes_of_flow_run(run.id) >= 1
    (folder / "SLOW").unlink()  # the remote copy still sleeps; end it so the case can finish
    pid = int(wait_for(lambda: (root / "remote" / case.uid / "engine.pid").read_text(), what="engine pid"))
    os.kill(pid, 9)  # the engine dies: pueue records Killed, and the case fails, once
    site.test_worker = start_worker(root)

    notes = reconcile()

    assert any("orphan-case: resumed" in note for note in notes)
    wait_for(lambda: site.ledger.find_case(str(folder)).state is CaseState.FAILED, timeout=180,
             what="the resumed case to finish")
    tasks = [t for t in fake_pueue.status()["tasks"].values() if t["label"].startswith(f"mqi-{case.uid}")]
    assert len(tasks) == 1 and len(site.ledger.attempts(case.id)) == 1
    assert site.ledger.attempts(case.id)[0].result is AttemptResult.KILLED
