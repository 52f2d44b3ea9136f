"""Starting process-case runs through the deployment, and knowing which are under way."""

from __future__ import annotations

from contextlib import nullcontext
from datetime import UTC, datetime, timedelta

from prefect import get_client
from prefect.client.orchestration import SyncPrefectClient
from prefect.client.schemas.filters import (
    FlowFilter,
    FlowFilterName,
    FlowRunFilter,
    FlowRunFilterState,
    FlowRunFilterStateType,
)
from prefect.client.schemas.objects import StateType
from prefect.deployments import run_deployment

from mqi.claims import claimed_case_ids
from mqi.ledger.records import Case
from mqi.runtime import get_site

PROCESS_CASE_DEPLOYMENT = "process-case/process-case"
NOT_CLAIMED_YET = [StateType.SCHEDULED, StateType.PENDING, StateType.RUNNING]
# A served run is RUNNING seconds before its process has imported the flow and claimed the
# case; without this grace the next scan launched the same case again. A RUNNING run older
# than this without a claim is a dead process: its case may be launched anew.
CLAIM_GRACE = timedelta(minutes=2)


def running_case_ids(client: SyncPrefectClient | None = None) -> set[int]:
    """Cases held by a live process, plus cases whose run is created but has not claimed them yet.
    `client`: one the caller keeps open (the main job's), else one for this call."""
    site = get_site()
    ids = claimed_case_ids(site.settings.state_dir)
    with nullcontext(client) if client is not None else get_client(sync_client=True) as api:
        runs = api.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=["process-case"])),
            flow_run_filter=FlowRunFilter(
                state=FlowRunFilterState(type=FlowRunFilterStateType(any_=NOT_CLAIMED_YET))
            ),
        )
    started_before = datetime.now(UTC) - CLAIM_GRACE
    for run in runs:
        ref = str(run.parameters.get("case", ""))
        long_running = run.state_type is StateType.RUNNING and run.start_time and run.start_time < started_before
        if ref.isdigit() and not long_running:
            ids.add(int(ref))
    return ids


def flow_run_name(case: Case) -> str:
    return f"case-{case.name}-{case.uid}"[:100]


def launch_cases(cases: list[Case]) -> None:
    for case in cases:
        run_deployment(PROCESS_CASE_DEPLOYMENT, parameters={"case": str(case.id)}, timeout=0,
                       flow_run_name=flow_run_name(case))
