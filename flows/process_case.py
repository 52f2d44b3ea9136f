"""`process-case`: one case from its folder to verified results, as the UI shows it."""

from __future__ import annotations

from prefect import flow
from prefect.states import Failed

from flows.hooks import cancel_remote_task
from mqi.claims import CaseBusy
from mqi.ledger.records import Case
from mqi.ledger.states import FINISHED_STATES, CaseState
from mqi.transport.base import HostRefused
from tasks.case_steps import (
    claim_case,
    choose_placement,
    live_attempt,
    placement_of,
    slot_candidates,
    record_outcome,
    register_case,
    submit_case,
    upload_case,
    wait_until_done,
)
from tasks.publish import gpu_slot, publish_outcome


@flow(name="process-case", on_cancellation=[cancel_remote_task])
def process_case(case: str, host: str | None = None, group: str | None = None) -> str:
    """Run one case: CASE is its folder, id or uid; HOST/GROUP pin where it runs."""
    record = register_case(case)
    if record.state in FINISHED_STATES:
        return record.state.value  # a rerun is `mqi retry`, a new attempt
    try:
        with claim_case(record):  # one live run per case; the claim dies with the process
            state = run_case(record, host, group)
            while state == CaseState.PENDING:  # the retry policy sent it back: a new attempt
                state = run_case(record, host, group)
            return state
    except CaseBusy:
        return "busy"  # another live run has it: nothing to do here
    except HostRefused as refused:  # an operator must act (host key, credentials): the case waits
        # where it is, never failed. Returned as the run's state, not raised: the message, no
        # traceback (`mqi submit` raises it and shows it as an error).
        return Failed(message=str(refused), data=refused)


def run_case(record: Case, host: str | None, group: str | None) -> str:
    attempt = live_attempt(record)  # a live attempt is resumed: never a second remote task
    if attempt is None:
        placement = choose_placement(record, host, group)
        if not upload_case(record, placement):  # before taking the slot: the GPU never waits for us
            return publish_outcome(record)  # the folder itself is unusable: failed, never retried
        candidates = slot_candidates(record, placement, group)  # any free group on that host
    else:
        candidates = [placement_of(attempt)]
    with gpu_slot(record, candidates) as slot:  # from submission until the task is finished or killed
        attempt = submit_case(record, slot.placement, attempt)
        slot.let_next_case_in()  # cases reach pueue in the order they arrived
        outcome = wait_until_done(record, attempt)
    record_outcome(record, attempt, outcome)  # downloads after giving the slot back
    return publish_outcome(record)  # a summary in the UI; the state the case is in now
