"""Thin Prefect tasks over mqi.casework: each names one step of a case in the Prefect UI."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.runtime import flow_run

from mqi import casework, claims
from mqi.ledger.records import Attempt, Case
from mqi.ledger.store import CaseMovedOn
from mqi.runtime import get_site
from mqi.site import Placement
from mqi.transport.base import TransportError

TRANSIENT_RETRY_DELAYS = [20, 60, 180, 600, 1200]


def actor() -> str:
    return f"flow-run/{flow_run.id}" if flow_run.id else "cli"


def _transient(task, task_run, state) -> bool:
    """Retry a step only for host or network trouble that may pass."""
    try:
        state.result()
    except TransportError as exc:
        return exc.transient
    except Exception:
        return False
    return False


def retried_when_transient(function):
    """A step that host or network trouble sends round again, after growing pauses."""
    return task(function, name=function.__name__.replace("_", "-"), retries=len(TRANSIENT_RETRY_DELAYS),
                retry_delay_seconds=TRANSIENT_RETRY_DELAYS, retry_condition_fn=_transient)


@task(name="register-case")
def register_case(ref: str) -> Case:
    return casework.register(get_site(), ref, actor())


def claim_case(case: Case):
    """Hold the case for this process (not a task: it spans the whole run)."""
    return claims.claim(get_site().settings.state_dir, case.id)


@retried_when_transient
def upload_case(case: Case, host: str | None, group: str | None) -> Placement | None:
    """Place the case and send its folder, verified. None: nothing more to do here (the folder
    itself is unusable and the case failed, or it was cancelled first)."""
    site = get_site()
    try:
        placement = casework.wait_for_placement(site, case, host, group)
        return placement if casework.upload(site, case, placement, actor()) else None
    except CaseMovedOn:
        return None


@task(name="wait-for-gpu-slot")
def admit_case(case: Case, uploaded_to: Placement, group: str | None) -> None:
    """Take a GPU slot of a group on the host the case was sent to (any free one unless a group
    is pinned), then add its task. Trouble adding it is left to `submit-case`, which retries."""
    site = get_site()
    candidates = casework.slot_candidates(site, case, uploaded_to, group)
    try:
        casework.admit_and_submit(site, case, candidates, actor(), flow_run_id=str(flow_run.id or "") or None)
    except CaseMovedOn:
        pass  # cancelled: the case's next step says what is left to do
    except TransportError as exc:
        if not exc.transient:
            raise
        get_run_logger().warning("case %s: adding its task failed (%s); trying again", case.name, exc)


@retried_when_transient
def submit_case(case: Case, attempt: Attempt) -> None:
    """Add the task of an admitted attempt, or adopt the one with its label (a resumed run)."""
    try:
        casework.submit(get_site(), case, attempt, actor())
    except CaseMovedOn:
        pass


@task(name="wait-until-done")
def wait_until_done(case: Case, attempt: Attempt) -> None:
    artifact_id = create_progress_artifact(progress=float(case.progress), key=f"progress-{case.uid}",
                                           description=f"MOQUI progress of {case.name}")

    def on_progress(percent: int) -> None:
        update_progress_artifact(artifact_id=artifact_id, progress=float(percent))
        get_run_logger().info("case %s: %d%%", case.name, percent)

    casework.wait_for(get_site(), case, attempt, actor(), on_progress)


@task(name="kill-task")
def kill_task(case: Case, attempt: Attempt) -> None:
    """Kill the attempt's task (a cancel, or its timeout) and wait until the kill is confirmed."""
    casework.kill_until_confirmed(get_site(), case, attempt, actor())


@retried_when_transient
def fetch_results(case: Case, attempt: Attempt) -> None:
    casework.fetch_results(get_site(), case, attempt, actor())
