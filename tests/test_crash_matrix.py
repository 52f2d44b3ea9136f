"""The crash matrix of issue 13: `mqi run` and its Prefect server die together (a power cut,
a reboot, a systemd restart of the unit) while cases stand at every step of their life, then
`mqi run` starts again on the same state_dir.

One `mqi run`, not one per crash point: the cases are stopped at their steps with fault holds
(mqi/faults.py), or stand there by nature (a case beyond the slots is only registered; a case
pinned to a full group waits, uploaded, for a slot). When every case is in place, the test
SIGKILLs the job's process group and the server's together. The restarted job must bring every
case to its right end: each attempt with exactly one pueue task, every GPU limit in Prefect
back at zero active slots, nothing partial among the results, and events that tell who did what.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from mqi.faults import FAULT_HOLD_DIR_VARIABLE, FAULT_HOLD_VARIABLE
from mqi.ledger import Ledger
from mqi.ledger.states import AttemptResult, CaseState, FailureCategory
from mqi.ledger.store import CaseNotFound
from mqi.site import gpu_limit_name
from tests.support.cases import make_case, pid_alive, ssh_host, wait_for
from tests.support.faults import active_slots, staging_leftovers, tasks_labelled, tree_digest
from tests.support.sshd import free_port

# Two starts of a runtime with its Prefect server and seven cases each: a guard against a hang,
# above pytest's 300 s default; the tests wait for conditions, not for time.
pytestmark = pytest.mark.timeout(900)

MQI = [sys.executable, "-m", "mqi.cli"]
# Each case's folder says how long its engine runs (the command runs inside the uploaded folder).
ENGINE = ('sleep "$(cat seconds)"; mkdir -p output && cp RTPLAN.dcm output/dose.dcm '
          "&& head -c 4096 /dev/urandom > output/dose.raw")
# Short, so that the case left running past it is killed for its timeout within the test; every
# other engine ends well within it.
TIMEOUT_SECONDS = 10.0
JOB_START_TIMEOUT = 180.0  # the embedded Prefect server starts (and migrates) on a shared 2-CPU box
STEP_TIMEOUT = 90.0
BUSY, SPARE = "busy", "spare"


@dataclass(frozen=True)
class Step:
    """A case that stands at one step when the power goes."""

    case: str
    group: str | None  # pinned to this group; None: the job registers it from the inbox
    engine_seconds: float
    hold: str | None  # the fault point its thread stops at, if it does not stand there by nature
    states_at_crash: tuple[CaseState, ...]
    # What the restarted job records for it, in order.
    story_after_restart: tuple[CaseState, ...]


DONE = (CaseState.DOWNLOADING, CaseState.COMPLETED)
STEPS = {s.case: s for s in [
    # Its task runs on past the timeout: the job moves it to killing and stops before the kill.
    Step("killing", BUSY, 600, "before-kill", (CaseState.KILLING,), (CaseState.FAILED,)),
    # Its task is seen running; the task ends on the host while the job is dead.
    Step("running", BUSY, 2, "while-waiting", (CaseState.QUEUED, CaseState.RUNNING), DONE),
    Step("downloading", SPARE, 0, "before-download", (CaseState.DOWNLOADING,), (CaseState.COMPLETED,)),
    # `pueue add` done, the task id not yet recorded: the restarted job adopts the task.
    Step("submitted", BUSY, 0.5, "after-add", (CaseState.UPLOADING,), (CaseState.QUEUED, CaseState.RUNNING, *DONE)),
    # Uploaded; its group's three slots are held by the three cases above.
    Step("waiting-for-slot", BUSY, 0.2, None, (CaseState.UPLOADING,), (CaseState.QUEUED, CaseState.RUNNING, *DONE)),
    # Its upload step taken in the ledger, nothing sent yet.
    Step("uploading", SPARE, 0.2, "before-upload", (CaseState.UPLOADING,),
         (CaseState.QUEUED, CaseState.RUNNING, *DONE)),
    # Registered by the job's inbox scan; not started: all six slots' worth of cases are busy.
    Step("registered", None, 0.2, None, (CaseState.PENDING,),
         (CaseState.UPLOADING, CaseState.QUEUED, CaseState.RUNNING, *DONE)),
]}


def test_power_cut_at_every_step_then_restart_brings_every_case_to_its_end(tmp_path, sshd, fake_pueue):
    fake_pueue.add_group(BUSY, parallel=3)
    fake_pueue.add_group(SPARE, parallel=3)
    # Six cases may be past pending at once: one more stays registered.
    host = ssh_host(tmp_path, sshd, fake_pueue, groups=({"name": BUSY, "slots": 3}, {"name": SPARE, "slots": 3}))
    config, state_dir = write_config(tmp_path, host)
    ledger = Ledger.open(f"sqlite:///{tmp_path / 'mqi.db'}")
    holds = tmp_path / "holds"
    holds.mkdir()
    hold_spec = ",".join(f"{s.hold}@{s.case}" for s in STEPS.values() if s.hold)

    job = start_job(config, tmp_path, {FAULT_HOLD_VARIABLE: hold_spec, FAULT_HOLD_DIR_VARIABLE: str(holds)})
    try:
        wait_for_server(state_dir, job)
        bring_every_case_to_its_step(tmp_path, ledger, host, holds)
        at_crash = {name: ledger.find_case(str(folder_of(tmp_path, name))) for name in STEPS}
        events_at_crash = {name: len(ledger.events(case.id)) for name, case in at_crash.items()}
        power_cut(job, state_dir)
    finally:
        stop(job, state_dir)

    for name, case in at_crash.items():
        assert case.state in STEPS[name].states_at_crash, f"{name}: {case.state} when the power went"
    assert ledger.live_attempt(at_crash["submitted"].id).task_id is None  # added, not recorded
    assert not (tmp_path / "results").exists() or not any((tmp_path / "results").iterdir())

    for held in holds.iterdir():  # the dead threads' holds; the new job runs without any
        held.unlink()
    job = start_job(config, tmp_path, {})
    try:
        api_url = wait_for_server(state_dir, job)
        wait_or_tell(lambda: all(ledger.get_case(c.id).state in (CaseState.COMPLETED, CaseState.FAILED)
                                 for c in at_crash.values()),
                     STEP_TIMEOUT, lambda: f"not every case ended:\n{states_now(ledger, at_crash)}")
        limits = [gpu_limit_name(host["name"], group) for group in (BUSY, SPARE)]
        # Prefect shows the ledger's slots as they change (the next reconcile is a minute away).
        wait_or_tell(lambda: all(active_slots(limit, api_url) == 0 for limit in limits), 10,
                     lambda: f"GPU slots still active in Prefect: { {l: active_slots(l, api_url) for l in limits} }")
    finally:
        stop(job, state_dir, gracefully=True)

    for name, before in at_crash.items():
        check_case(tmp_path, ledger, fake_pueue, name, before, events_at_crash[name])
    assert staging_leftovers(tmp_path / "results") == [], "partial downloads left among the results"
    assert staging_leftovers(Path(host["workdir"])) == [], "partial uploads left on the host"


def bring_every_case_to_its_step(root: Path, ledger: Ledger, host: dict, holds: Path) -> None:
    """Cases are handed to the job a few at a time, so that the order in which they reach the
    upload gate and the GPU line is certain: a case stopped after `pueue add` keeps the line's
    turn, and one stopped before its upload keeps the host's upload gate."""
    add_pinned(root, ledger, host, "killing", "running", "downloading")
    wait_for_holds(holds, "running", "downloading")
    wait_for(lambda: running_task_of(ledger, root, "killing"), timeout=STEP_TIMEOUT, what="the killing case's task")
    add_pinned(root, ledger, host, "submitted")
    wait_for_holds(holds, "submitted")
    add_pinned(root, ledger, host, "waiting-for-slot")
    waiting = ledger.find_case(str(folder_of(root, "waiting-for-slot")))
    wait_for(lambda: (Path(host["workdir"]) / waiting.uid / "seconds").exists(), timeout=STEP_TIMEOUT,
             what="the waiting case to be uploaded")
    add_pinned(root, ledger, host, "uploading")
    wait_for_holds(holds, "uploading")
    make_engine_case(root, "registered")  # the job's scan registers it
    wait_for(lambda: any(c.name == "registered" for c in ledger.list_cases()), timeout=STEP_TIMEOUT,
             what="the inbox case to be registered")
    wait_for_holds(holds, "killing")  # its timeout has passed meanwhile
    # Still in line for a slot: the three slots of its group are held.
    assert ledger.get_case(waiting.id).state is CaseState.UPLOADING and ledger.live_attempt(waiting.id) is None
    assert ledger.slot_holders() == {(host["name"], BUSY): 3}


def add_pinned(root: Path, ledger: Ledger, host: dict, *names: str) -> None:
    """Cases registered pinned to their groups, from folders outside the job's inbox (an
    operator's pin; the scan never sees these folders). The job starts them from the ledger."""
    for name in names:
        folder = make_engine_case(root, name)
        ledger.register_case(folder, actor="test", pinned_host=host["name"], pinned_group=STEPS[name].group)


def make_engine_case(root: Path, name: str) -> Path:
    staged = make_case(root / "staging", name)
    (staged / "seconds").write_text(f"{STEPS[name].engine_seconds}\n")
    folder = folder_of(root, name)
    folder.parent.mkdir(parents=True, exist_ok=True)
    return staged.rename(folder)  # complete when it appears, as a copy tool does it


def move_into_inbox(root: Path, name: str) -> Path:
    return make_case(root / "staging", name).rename(root / "inbox" / name)


def folder_of(root: Path, name: str) -> Path:
    """The inbox for the case the job registers itself, a folder elsewhere for pinned ones."""
    return (root if STEPS[name].group is None else root / "elsewhere") / "inbox" / name


def running_task_of(ledger: Ledger, root: Path, name: str) -> bool:
    case = ledger.find_case(str(folder_of(root, name)))
    attempt = ledger.live_attempt(case.id)
    return attempt is not None and attempt.started_at is not None


def wait_for_holds(holds: Path, *names: str) -> None:
    for name in names:
        marker = holds / f"{name}@{STEPS[name].hold}.held"
        wait_for(marker.exists, timeout=STEP_TIMEOUT, what=f"case {name} to stop at {STEPS[name].hold}")


def wait_or_tell(predicate, timeout: float, tell) -> None:
    """Wait for `predicate`; on timeout fail with what `tell()` says then."""
    try:
        wait_for(predicate, timeout=timeout)
    except AssertionError:
        raise AssertionError(tell()) from None


def states_now(ledger: Ledger, cases: dict) -> str:
    return "\n".join(f"  {name}: {ledger.get_case(c.id).state}" for name, c in cases.items())


def check_case(root: Path, ledger: Ledger, fake_pueue, name: str, before, events_before: int) -> None:
    step = STEPS[name]
    case = ledger.get_case(before.id)
    [attempt] = ledger.attempts(case.id)  # no second attempt, whatever the step
    assert tasks_labelled(fake_pueue, attempt.label) == (1, 1), f"{name}: not exactly one pueue task"
    results = root / "results" / name
    if name == "killing":
        assert (case.state, case.failure_category, attempt.result) == (
            CaseState.FAILED, FailureCategory.TIMEOUT, AttemptResult.TIMEOUT)
        assert not results.exists()
    else:
        assert (case.state, attempt.result) == (CaseState.COMPLETED, AttemptResult.SUCCESS), (
            f"{name}: {case.state} ({case.failure_category}: {case.failure_message})")
        assert tree_digest(results) == tree_digest(Path(attempt.remote_dir) / "output"), f"{name}: results differ"
    events = ledger.events(case.id)
    after = events[events_before:]
    story = step.story_after_restart
    if before.state is CaseState.QUEUED:  # its task was seen queued before the crash, started after
        story = (CaseState.RUNNING, *story)
    assert tuple(e.to_state for e in after) == story, (
        f"{name}: {[(e.to_state.value, e.actor, e.message) for e in events]}")
    # Who did what: the dead job's run up to the crash, one run of the new job after it.
    runs_before = {e.actor for e in events[1:events_before]}
    runs_after = {e.actor for e in after}
    assert len(runs_after) == 1 and next(iter(runs_after)).startswith("flow-run/"), (name, runs_after)
    assert runs_after.isdisjoint(runs_before), name
    assert len(runs_before) <= 1, (name, runs_before)


# -- the job as a user starts it, and the power cut ---------------------------------------


def write_config(root: Path, host: dict, *, command: str = ENGINE, timeout_hours: float = TIMEOUT_SECONDS / 3600,
                 **more) -> tuple[Path, Path]:
    (root / "inbox").mkdir()
    state_dir = root / ".mqi"
    config = root / "mqi.yaml"
    config.write_text(yaml.safe_dump({
        "state_dir": str(state_dir),
        "inbox": {"path": str(root / "inbox"), "quiet_seconds": 0, "scan_seconds": 0.5},
        "results_dir": str(root / "results"),
        "ledger": {"url": f"sqlite:///{root / 'mqi.db'}"},
        "case": {"command": command, "poll_seconds": 0.2, "timeout_hours": timeout_hours},
        "hosts": [host],
        **more,
    }))
    return config, state_dir


def start_job(config: Path, root: Path, extra_env: dict[str, str]) -> subprocess.Popen:
    """`mqi run` in a session of its own, as systemd or a terminal starts it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MQI_"))} | extra_env
    with open(root / "run.log", "ab") as log:
        return subprocess.Popen([*MQI, "--config", str(config), "run"], cwd=root, env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)


def server_record(state_dir: Path) -> dict | None:
    try:
        return json.loads((state_dir / "prefect" / "server.json").read_text())
    except (OSError, ValueError):
        return None


def wait_for_server(state_dir: Path, job: subprocess.Popen) -> str:
    """The API URL of the job's embedded Prefect server once it answers."""

    def started():
        assert job.poll() is None, f"mqi run exited with {job.returncode}:\n{job_log(state_dir)}"
        record = server_record(state_dir)
        return record if record and pid_alive(record["pid"]) else None

    return wait_for(started, timeout=JOB_START_TIMEOUT, what="the embedded Prefect server")["api_url"]


def job_log(state_dir: Path) -> str:
    return (state_dir.parent / "run.log").read_text(errors="replace")[-4000:]


def power_cut(job: subprocess.Popen, state_dir: Path) -> None:
    """SIGKILL `mqi run` and its Prefect server (each leads its own process group) at once."""
    record = server_record(state_dir)
    groups = [job.pid] + ([record["pid"]] if record and pid_alive(record["pid"]) else [])
    for group in groups:
        try:
            os.killpg(group, signal.SIGKILL)
        except ProcessLookupError:
            pass
    job.wait(30)
    wait_for(lambda: not any(pid_alive(pid) for pid in groups[1:]), timeout=30, what="the Prefect server to die")


def stop(job: subprocess.Popen, state_dir: Path, *, gracefully: bool = False) -> None:
    """Ctrl-C (the job stops its server itself), or SIGKILL of whatever is left of the job and
    its server (a test that failed before its power cut)."""
    if job.poll() is None and gracefully:
        os.killpg(job.pid, signal.SIGINT)
        try:
            job.wait(60)
        except subprocess.TimeoutExpired:
            pass  # (tests/test_main_job.py tests Ctrl-C)
    if job.poll() is None:
        power_cut(job, state_dir)


# -- only the Prefect server restarted under a running job ----------------------------------


def test_the_prefect_server_restarted_under_a_running_job(tmp_path, sshd, fake_pueue):
    """A site's own Prefect server dies (SIGKILL) while two cases run and a third waits for a
    slot; the engines end and the slots are given back while it is away; it comes back on the
    same port and database. Every case completes with one task, and Prefect's limit, which still
    counted the two slots when the server died, ends at zero (the ledger is the truth)."""
    go = tmp_path / "go"
    engine = f'while [ ! -e {go} ]; do sleep 0.1; done; mkdir -p output && cp RTPLAN.dcm output/dose.dcm'
    fake_pueue.add_group("gpu", parallel=2)
    host = ssh_host(tmp_path, sshd, fake_pueue, groups=({"name": "gpu", "slots": 2},))
    limit = gpu_limit_name(host["name"], "gpu")
    server = PrefectServer(tmp_path / "prefect-home", free_port())
    config, state_dir = write_config(tmp_path, host, command=engine, timeout_hours=24,
                                     prefect={"api_url": server.api_url})
    ledger = Ledger.open(f"sqlite:///{tmp_path / 'mqi.db'}")
    job = None
    try:
        server.start()
        job = start_job(config, tmp_path, {})
        folders = [move_into_inbox(tmp_path, f"case-{n}") for n in range(3)]
        wait_for(lambda: sorted(state_of(ledger, f) for f in folders) == ["pending", "running", "running"],
                 timeout=STEP_TIMEOUT, what="two cases running, one waiting")
        wait_for(lambda: active_slots(limit, server.api_url) == 2, timeout=10, what="Prefect to show both slots")

        server.kill()
        go.touch()  # the engines end while the server is away: both slots are given back
        wait_for(lambda: sum(state_of(ledger, f) in ("downloading", "completed") for f in folders) == 2,
                 timeout=STEP_TIMEOUT, what="the two tasks to be seen done")
        server.start()
        wait_or_tell(lambda: all(state_of(ledger, f) == "completed" for f in folders), STEP_TIMEOUT,
                     lambda: f"not every case completed: {[state_of(ledger, f) for f in folders]}")
        wait_or_tell(lambda: active_slots(limit, server.api_url) == 0, 10,
                     lambda: f"{active_slots(limit, server.api_url)} GPU slot(s) still active in Prefect")
    finally:
        try:
            if job is not None:
                stop(job, state_dir, gracefully=True)
        finally:
            server.kill()
    for folder in folders:
        case = ledger.find_case(str(folder))
        [attempt] = ledger.attempts(case.id)
        assert tasks_labelled(fake_pueue, attempt.label) == (1, 1), f"{case.name}: not exactly one pueue task"
        assert tree_digest(tmp_path / "results" / case.name) == tree_digest(Path(attempt.remote_dir) / "output")
        assert [e.to_state for e in ledger.events(case.id)].count(CaseState.COMPLETED) == 1
    assert staging_leftovers(tmp_path / "results") == []


def state_of(ledger: Ledger, folder: Path) -> str:
    try:
        return ledger.find_case(str(folder)).state.value
    except CaseNotFound:
        return "not registered"


class PrefectServer:
    """`prefect server start` on a fixed loopback port with its own home (database), in a
    session of its own: a site's server, killed and started again by the test."""

    def __init__(self, home: Path, port: int):
        self.home, self.port = home, port
        self.process: subprocess.Popen | None = None

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def start(self) -> None:
        self.home.mkdir(exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MQI_"))}
        env |= {"PREFECT_HOME": str(self.home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
        with open(self.home / "server.log", "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(self.port)],
                env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        wait_for(self.healthy, timeout=JOB_START_TIMEOUT, what=f"the Prefect server on port {self.port}")

    def healthy(self) -> bool:
        assert self.process.poll() is None, (self.home / "server.log").read_text()[-3000:]
        try:
            with urllib.request.urlopen(f"{self.api_url}/health", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(30)
