"""`process-case`: one case from its folder to verified results, as the UI shows it."""

from __future__ import annotations

from prefect import flow
from prefect.states import Failed

from flows.hooks import cancel_remote_task
from mqi.claims import CaseBusy
from mqi.ledger.states import FINISHED_STATES
from mqi.resume import CaseRun, Step, close_ended_attempt
from mqi.runtime import get_site
from mqi.transport.base import HostRefused
from tasks.case_steps import (
    actor,
    admit_case,
    claim_case,
    fetch_results,
    kill_task,
    register_case,
    submit_case,
    upload_case,
    wait_until_done,
)
from tasks.publish import publish_outcome


@flow(name="process-case", on_cancellation=[cancel_remote_task])
def process_case(case: str, host: str | None = None, group: str | None = None) -> str:
    """Run one case: CASE is its folder, id or uid; HOST/GROUP pin where it runs."""
    record = register_case(case)
    if record.state in FINISHED_STATES:
        return record.state.value  # a rerun is `mqi retry`, a new attempt
    try:
        with claim_case(record):  # one live run per case; the claim dies with the process
            run = CaseRun(get_site(), record.id, host, group)
            while (step := run.next_step()) is not Step.DONE:  # mqi/resume.py: the one table
                take_step(run, step)
    except CaseBusy:
        return "busy"  # another live run has it: nothing to do here
    except HostRefused as refused:  # an operator must act (host key, credentials): the case waits
        # where it is, never failed. Returned as the run's state, not raised: the message, no
        # traceback (`mqi submit` raises it and shows it as an error).
        return Failed(message=str(refused), data=refused)
    return publish_outcome(record)  # a summary in the UI; the state the case is in now


def take_step(run: CaseRun, step: Step) -> None:
    """The story of a case: sent to a host, admitted to a GPU slot, its task added, waited
    for, and its results fetched; or its task killed (a cancel, a timeout)."""
    case, attempt = run.case, run.attempt
    if step is Step.UPLOAD:  # before taking a slot: the GPU never waits for our upload
        run.uploaded_to = upload_case(case, run.host, run.group)
    elif step is Step.ADMIT:
        admit_case(case, run.uploaded_to, run.group)
    elif step is Step.SUBMIT:
        submit_case(case, attempt)
    elif step is Step.WAIT:
        wait_until_done(case, attempt)
    elif step is Step.KILL:
        kill_task(case, attempt)
    elif step is Step.FETCH:
        fetch_results(case, attempt)
    elif step is Step.CLOSE:
        close_ended_attempt(run.site, case, actor())
