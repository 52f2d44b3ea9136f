"""Flow-run state hooks: what happens to a case when its flow run is cancelled."""

from __future__ import annotations

import logging

from mqi import casework
from mqi.ledger.states import FINISHED_STATES
from mqi.runtime import get_site

log = logging.getLogger(__name__)


def cancel_remote_task(flow, flow_run, state) -> None:
    """Cancelling the flow run in the UI kills the remote task and records `cancelled`."""
    site = get_site()
    ref = str(flow_run.parameters.get("case", ""))
    actor = f"flow-run/{flow_run.id}"
    case = site.ledger.find_case(ref) if ref else None
    if case is None or case.state in FINISHED_STATES:
        return
    casework.cancel(site, case, actor, "flow run cancelled")
