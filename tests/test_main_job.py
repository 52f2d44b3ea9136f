"""`mqi run`, the main job, as a user starts it: an embedded Prefect server, the inbox, Ctrl-C."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from uuid import UUID

import pytest
import yaml

from mqi.ledger.states import AttemptResult, CaseState
from tests.support.cases import (
    OUTPUT,
    case_state,
    local_host,
    make_case,
    mqi_listing_imports,
    pid_alive,
    settings_for,
    start,
    wait_for,
)

MQI = [sys.executable, "-m", "mqi.cli"]


def write_config(root: Path) -> Path:
    engine = f"{shlex.quote(sys.executable)} -m mqi.demo_engine --batches 2 --seconds-per-batch 0.1"
    config = root / "mqi.yaml"
    config.write_text(yaml.safe_dump({
        "state_dir": str(root / ".mqi"),
        "inbox": {"path": str(root / "inbox"), "quiet_seconds": 1, "scan_seconds": 2},
        "results_dir": str(root / "results"),
        "ledger": {"url": f"sqlite:///{root / 'mqi.db'}"},
        "case": {"command": engine, "poll_seconds": 0.5},
        "hosts": [{"name": "local", "workdir": str(root / "work"), "groups": [{"name": "gpu0", "slots": 1}]}],
    }))
    (root / "inbox").mkdir()
    return config


def status(config: Path) -> list[dict]:
    result = subprocess.run([*MQI, "--config", str(config), "status", "--json"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def show_importing(config: Path, cwd: Path, env: dict) -> subprocess.CompletedProcess:
    """`mqi show 1` as a new process, with the modules it imported listed on stderr."""
    result = mqi_listing_imports(["--config", str(config), "show", "1"], cwd, env)
    assert result.returncode == 0, result.stderr[-2000:]
    return result


def test_main_job_processes_the_inbox_shows_its_ui_refuses_a_twin_and_stops_on_ctrl_c(tmp_path):
    config = write_config(tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    log = tmp_path / "run.log"
    job = subprocess.Popen([*MQI, "--config", str(config), "run"], cwd=tmp_path, env=env,
                           stdout=open(log, "wb"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        ui_line = wait_for(lambda: next((l for l in log.read_text().splitlines() if l.startswith("Prefect UI:")), None),
                           timeout=180, what="the UI address")
        api = ui_line.split("API ")[1].rstrip(")")
        assert urllib.request.urlopen(f"{api}/health", timeout=5).status == 200

        staging = tmp_path / "staging" / "case-1"
        staging.mkdir(parents=True)
        (staging / "RTPLAN.dcm").write_bytes(b"plan")
        staging.rename(tmp_path / "inbox" / "case-1")  # appears complete, as a copy tool would
        wait_for(lambda: [c["state"] for c in status(config)] == ["completed"], timeout=180,
                 what="the case to complete")
        assert (tmp_path / "results" / "case-1" / "dose.raw").exists()
        answer = show_importing(config, tmp_path, env)
        assert answer.stdout.startswith("case 1  case-1") and "sqlalchemy" not in answer.stderr  # the job answered

        twin = subprocess.run([*MQI, "--config", str(config), "run"], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=120)
        assert twin.returncode != 0
        assert f"pid {job.pid}" in twin.stderr and "stop it first" in twin.stderr
    finally:
        os.killpg(job.pid, signal.SIGINT)  # Ctrl-C reaches the whole foreground group
        try:
            job.wait(90)
        except subprocess.TimeoutExpired:
            os.killpg(job.pid, signal.SIGKILL)
            raise
    # A scan or reconcile run caught mid-way by Ctrl-C is reported crashed by Prefect itself
    # (its own traceback); no error may come from our code.
    output = log.read_text()
    ours = [line for line in output.splitlines()
            if 'File "' in line and any(f"/{part}/" in line for part in ("mqi", "flows", "tasks", "blocks"))]
    assert not ours, output[-3000:]
    assert "error:" not in output, output[-3000:]
    by_itself = show_importing(config, tmp_path, env)
    assert by_itself.stdout == answer.stdout and "sqlalchemy" in by_itself.stderr  # no job: read the ledger
    time.sleep(1)
    try:
        urllib.request.urlopen(f"{api}/health", timeout=2)
        raise AssertionError("the embedded Prefect server outlived mqi run")
    except OSError:
        pass


# -- the main job's loop in this process: runs as threads, UI cancellation, stop and resume --


@pytest.fixture
def main_job(prefect_server):
    """Start `MainJob.run` in a thread for the given site; stopped (and joined) at the end."""
    from flows.main_job import MainJob

    started = []

    def start_job(site):
        job = MainJob(site)
        thread = threading.Thread(target=job.run, name="main-job", daemon=True)
        thread.start()
        started.append((job, thread))
        return job, thread

    yield start_job
    for job, thread in started:
        job.shutdown()
        thread.join(60)


def flow_run_of(case):
    from prefect import get_client

    with get_client(sync_client=True) as client:
        return client.read_flow_run(UUID(case.flow_run_id)) if case.flow_run_id else None


def live_attempt(site, folder):
    case = site.ledger.find_case(str(folder))
    return site.ledger.live_attempt(case.id)


def test_inbox_cases_run_as_threads_of_the_job_and_a_ui_cancel_kills_the_task(tmp_path, main_job):
    from prefect import get_client
    from prefect.states import Cancelling

    pid_file = tmp_path / "engine.pid"
    site = start(settings_for(tmp_path, [local_host(tmp_path)], command=f"echo $$ > {pid_file}; exec sleep 60"))
    job, _ = main_job(site)
    folder = make_case(tmp_path, "case-a")

    wait_for(lambda: case_state(site, folder) is CaseState.RUNNING, timeout=60, what="the case to run")
    attempt = live_attempt(site, folder)
    run_id = UUID(attempt.flow_run_id)
    assert run_id in job.runs and job.runs[run_id].thread.is_alive()  # a thread here, not a process
    assert any(t.name == job.runs[run_id].thread.name for t in threading.enumerate())
    engine_pid = int(wait_for(lambda: pid_file.exists() and pid_file.read_text().strip(), what="the engine"))
    assert pid_alive(engine_pid)

    with get_client(sync_client=True) as client:
        client.set_flow_run_state(run_id, Cancelling(message="from the UI"), force=True)
    wait_for(lambda: case_state(site, folder) is CaseState.CANCELLED, timeout=60, what="the case cancelled")
    assert not pid_alive(engine_pid)
    [attempt] = site.ledger.attempts(site.ledger.find_case(str(folder)).id)
    assert attempt.result is AttemptResult.CANCELLED
    with get_client(sync_client=True) as client:
        wait_for(lambda: client.read_flow_run(run_id).state.is_cancelled(), timeout=30, what="the run cancelled")


def test_stopping_the_job_leaves_cases_to_resume_with_the_same_task(tmp_path, main_job):
    from prefect import get_client

    site = start(settings_for(tmp_path, [local_host(tmp_path)], command="sleep 4; " + OUTPUT))
    job, thread = main_job(site)
    folder = make_case(tmp_path, "case-a")
    wait_for(lambda: case_state(site, folder) is CaseState.RUNNING, timeout=60, what="the case to run")
    first = live_attempt(site, folder)

    job.shutdown()
    thread.join(30)
    assert not thread.is_alive() and not job.runs[UUID(first.flow_run_id)].thread.is_alive()
    assert case_state(site, folder) is CaseState.RUNNING  # not failed: the task goes on on the host
    with get_client(sync_client=True) as client:
        assert client.read_flow_run(UUID(first.flow_run_id)).state.is_crashed()

    main_job(site)  # started again: reconcile resumes the case with the task it already has
    wait_for(lambda: case_state(site, folder) is CaseState.COMPLETED, timeout=90, what="the case resumed")
    [attempt] = site.ledger.attempts(site.ledger.find_case(str(folder)).id)
    assert (attempt.task_id, attempt.result) == (first.task_id, AttemptResult.SUCCESS)
    assert (tmp_path / "results" / "case-a" / "dose.dcm").exists()


def test_cases_started_together_upload_in_arrival_order_though_the_first_is_slow_to_get_there(
        tmp_path, main_job, monkeypatch):
    """Runs started together reach the upload gate in whatever order their threads get going;
    the gate keeps the turn for an earlier case the job started (tests/test_arrival_line.py)."""
    from mqi import arrival_line, casework
    from mqi.arrival_line import ExpectedArrivals

    class Recorded(ExpectedArrivals):
        def arrived(self, key):
            arrivals.setdefault(key, time.time())  # the first: at the gate, or when its run ended
            super().arrived(key)

    def slow_for_the_first(site, case, host, group):
        if case.name == "case-0":
            time.sleep(1.5)  # the others reach the gate first
        return place(site, case, host, group)

    arrivals = {}
    place = casework.wait_for_placement
    monkeypatch.setattr(casework, "wait_for_placement", slow_for_the_first)
    monkeypatch.setattr(arrival_line, "EXPECTED_GRACE_SECONDS", 60.0)  # however slow this machine is
    settings = settings_for(tmp_path, [local_host(tmp_path, groups=({"name": "gpu0", "slots": 3},))], command=OUTPUT)
    settings.inbox.path.mkdir(parents=True)
    site = start(settings)
    site.expected_arrivals = Recorded()  # before the first upload creates the gate
    for number in range(3):
        staged = make_case(tmp_path / "staging", f"case-{number}")
        staged.rename(settings.inbox.path / staged.name)
    main_job(site)
    folders = [settings.inbox.path / f"case-{number}" for number in range(3)]
    for folder in folders:
        wait_for(lambda: case_state(site, folder) is CaseState.COMPLETED, timeout=90, what=f"{folder.name} to complete")

    cases = sorted((site.ledger.find_case(str(folder)) for folder in folders), key=casework.arrival_key)
    assert cases[0].name == "case-0"  # the slow one is the earliest
    uploading = {case.name: next(e.at for e in site.ledger.events(case.id) if e.to_state is CaseState.UPLOADING)
                 for case in cases}
    assert sorted(uploading, key=uploading.get) == [case.name for case in cases]
    for case in cases:  # each was expected, and reached the gate before its upload began
        assert arrivals[casework.arrival_key(case)] <= uploading[case.name].timestamp()
    assert not site.expected_arrivals._since


def test_the_job_replaces_its_prefect_client_after_a_failed_call(tmp_path, prefect_server):
    """The loop keeps one client, but not one that failed: once it has reached the server,
    Prefect's client retries a lost server for about a minute on every call."""
    from uuid import uuid4

    from prefect.client.orchestration import SyncPrefectClient
    from prefect.states import Crashed

    from flows.main_job import MainJob

    job = MainJob(start(settings_for(tmp_path, [local_host(tmp_path)], command=OUTPUT)))
    kept = job.api
    assert job.api is kept  # one client between calls
    job._api = SyncPrefectClient("http://127.0.0.1:9/api")  # nothing listens there: as a server gone
    job._api.__enter__()
    job._set_state(uuid4(), Crashed())  # logged, not raised
    assert job._api is None
    assert job.api.hello().status_code == 200  # a new client, to the server that is there
    job.close_api()
    kept.__exit__(None, None, None)


def test_the_job_s_client_tries_a_busy_server_again_at_once_not_after_prefect_s_back_off():
    """A Prefect server on SQLite answers a colliding write with 503; Prefect's client would
    wait 2 s before its next try, the job's waits BUSY_RETRY_AFTER_SECONDS."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from prefect.client.orchestration import SyncPrefectClient

    from tasks.publish import BUSY_RETRY_AFTER_SECONDS, PROMPT_CLIENT_SETTINGS

    answers = []

    class BusyOnce(BaseHTTPRequestHandler):
        def do_GET(self):
            status = 503 if not answers else 200
            answers.append(status)
            body = b'"busy"' if status == 503 else b'"hello"'
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), BusyOnce)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with SyncPrefectClient(f"http://127.0.0.1:{server.server_port}/api",
                               httpx_settings=PROMPT_CLIENT_SETTINGS) as client:
            started = time.monotonic()
            response = client._client.get("/hello")
            took = time.monotonic() - started
    finally:
        server.shutdown()
    assert answers == [503, 200] and response.json() == "hello"
    assert took < BUSY_RETRY_AFTER_SECONDS + 0.9  # Prefect's own back-off is 2 s or more


def test_a_run_started_through_the_api_is_carried_by_the_job(tmp_path, main_job):
    from prefect.deployments import run_deployment

    site = start(settings_for(tmp_path, [local_host(tmp_path)], command=OUTPUT))
    job, _ = main_job(site)
    elsewhere = make_case(tmp_path / "elsewhere", "case-b")  # not in the inbox: only the API starts it
    wait_for(lambda: "process-case" in job.deployment_of, what="the deployments")

    run = run_deployment("process-case/process-case", parameters={"case": str(elsewhere)}, timeout=60)
    assert run.state.is_completed(), run.state
    assert case_state(site, elsewhere) is CaseState.COMPLETED


def test_a_folder_moved_into_the_inbox_is_taken_at_once_not_at_the_next_scan(tmp_path, main_job):
    settings = settings_for(tmp_path, [local_host(tmp_path)], command=OUTPUT)
    settings.inbox.scan_seconds = 300  # the periodic scan would not come within this test
    settings.inbox.path.mkdir(parents=True)
    site = start(settings)
    job, _ = main_job(site)
    wait_for(lambda: any(t.name == "inbox-watch" for t in threading.enumerate()), what="the inbox watch")
    time.sleep(2)  # the job's first scan is over: only a change can bring the next one early

    staged = make_case(tmp_path / "staging", "case-w")
    staged.rename(settings.inbox.path / "case-w")
    wait_for(lambda: case_state(site, settings.inbox.path / "case-w") is CaseState.COMPLETED, timeout=60,
             what="the moved folder to be processed")


def test_runs_left_running_by_a_killed_job_are_closed_as_crashed(tmp_path, main_job):
    from prefect import get_client
    from prefect.states import Running

    from flows.main_job import MainJob

    site = start(settings_for(tmp_path, [local_host(tmp_path)], command=OUTPUT))
    first = MainJob(site)
    first.register_deployments()
    first.close_api()
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name("process-case/process-case")
        left = client.create_flow_run_from_deployment(deployment.id, parameters={"case": "999999"})
        client.set_flow_run_state(left.id, Running(), force=True)  # as a SIGKILLed job leaves it

        main_job(site)
        wait_for(lambda: client.read_flow_run(left.id).state.is_crashed(), timeout=30, what="the run closed")
