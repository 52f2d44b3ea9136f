"""Flow-run state hooks: what happens to a case when its flow run is cancelled."""

from __future__ import annotations

from mqi import casework
from mqi.ledger.states import FINISHED_STATES
from mqi.ledger.store import CaseFinished
from mqi.runtime import get_site

# What Prefect's runner says when it cancels its runs because it is being stopped.
RUNNER_SHUTDOWN = "Runner is shutting down"


def cancel_remote_task(flow, flow_run, state) -> None:
    """Cancelling the flow run in the UI kills the remote task and records `cancelled`."""
    if state.message and RUNNER_SHUTDOWN in state.message:
        return  # `mqi run` stopping is not a cancellation: reconcile resumes the case later
    site = get_site()
    ref = str(flow_run.parameters.get("case", ""))
    actor = f"flow-run/{flow_run.id}"
    case = site.ledger.find_case(ref) if ref else None
    if case is None or case.state in FINISHED_STATES:
        return
    try:
        casework.cancel(site, case, actor, "flow run cancelled")
    except CaseFinished:
        pass  # it finished meanwhile: nothing left to cancel
