"""Thin Prefect tasks over mqi.casework: each names one step of a case in the Prefect UI."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.runtime import flow_run

from mqi import casework, claims
from mqi.ledger.records import Attempt, Case
from mqi.ledger.states import CaseState
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


@task(name="register-case")
def register_case(ref: str) -> Case:
    return casework.register(get_site(), ref, actor())


def claim_case(case: Case):
    """Hold the case for this process (not a task: it spans the whole run)."""
    return claims.claim(get_site().settings.state_dir, case.id)


# Ledger look-ups, not steps: plain calls. A task run costs the Prefect server some 25 ms of
# CPU (its states and events are written) and shows the physicist nothing.


def live_attempt(case: Case) -> Attempt | None:
    return get_site().ledger.live_attempt(case.id)


@task(name="choose-placement")
def choose_placement(case: Case, host: str | None, group: str | None) -> Placement:
    return casework.wait_for_placement(get_site(), case, host, group)


def slot_candidates(case: Case, placement: Placement, group: str | None) -> list[Placement]:
    return casework.slot_candidates(get_site(), case, placement, group)


def placement_of(attempt: Attempt) -> Placement:
    return get_site().placement(attempt.host, attempt.group)


@task(name="upload-case", retries=len(TRANSIENT_RETRY_DELAYS), retry_delay_seconds=TRANSIENT_RETRY_DELAYS,
      retry_condition_fn=_transient)
def upload_case(case: Case, placement: Placement) -> bool:
    """False when the case folder itself is unusable: the case has failed, nothing was sent."""
    return casework.upload(get_site(), case, placement, actor())


@task(name="submit-case", retries=len(TRANSIENT_RETRY_DELAYS), retry_delay_seconds=TRANSIENT_RETRY_DELAYS,
      retry_condition_fn=_transient)
def submit_case(case: Case, placement: Placement, attempt: Attempt | None) -> Attempt:
    site = get_site()
    if attempt is None:
        return casework.submit(site, case, placement, actor(), flow_run_id=str(flow_run.id or ""))
    # Resuming after a crash between `pueue add` and the ledger's QUEUED (the task id may have
    # been recorded, by us or by reconcile, without the move): the task is adopted by label.
    if attempt.task_id is None or site.ledger.get_case(case.id).state is CaseState.UPLOADING:
        return casework.add_task(site, case, attempt, placement, actor())
    return attempt


@task(name="wait-until-done")
def wait_until_done(case: Case, attempt: Attempt) -> casework.WaitOutcome:
    artifact_id = create_progress_artifact(progress=float(case.progress), key=f"progress-{case.uid}",
                                           description=f"MOQUI progress of {case.name}")

    def on_progress(percent: int) -> None:
        update_progress_artifact(artifact_id=artifact_id, progress=float(percent))
        get_run_logger().info("case %s: %d%%", case.name, percent)

    return casework.wait_for(get_site(), case, attempt, actor(), on_progress)


@task(name="record-outcome", retries=len(TRANSIENT_RETRY_DELAYS), retry_delay_seconds=TRANSIENT_RETRY_DELAYS,
      retry_condition_fn=_transient)
def record_outcome(case: Case, attempt: Attempt, outcome: casework.WaitOutcome) -> Case:
    return casework.record_outcome(get_site(), case, attempt, outcome, actor())
