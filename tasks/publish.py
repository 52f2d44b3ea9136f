"""What the Prefect UI and automations see of a case: GPU limits, a summary, events."""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from uuid import UUID

import httpx
from prefect import get_client, task
from prefect.artifacts import create_markdown_artifact
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate, GlobalConcurrencyLimitUpdate
from prefect.events import emit_event
from prefect.exceptions import ObjectNotFound

from mqi import casework, claims
from mqi.arrival_line import ArrivalLine
from mqi.host_health import HostHealth
from mqi.ledger.records import Case
from mqi.ledger.states import CaseState
from mqi.runtime import get_site, site_hooks
from mqi.settings import Settings
from mqi.site import Placement, Site, gpu_limit_name
from mqi.timefmt import local_text

log = logging.getLogger(__name__)

# A slot whose holder died is given back when its lease runs out unrenewed (a third of this
# between renewals while the holder lives), or at once by reconcile or the case's next run.
SLOT_LEASE_SECONDS = 60
# Between rounds over the candidate groups: short, since only cases the inbox scan admitted
# (as many as the groups hold) wait here, and a freed slot should not stay idle.
SLOT_RETRY_SECONDS = 1.0
# The cases of this process take slots and reach pueue in arrival order.
ARRIVAL_LINE = ArrivalLine(retry_seconds=SLOT_RETRY_SECONDS)
BUSY_RETRY_SECONDS = (0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2)


def ensure_gpu_limits(settings: Settings) -> None:
    """One Prefect global concurrency limit per host and group, limit = slots + queue_ahead."""
    with get_client(sync_client=True) as client:
        for host in settings.hosts:
            for group in host.groups:
                name = gpu_limit_name(host.name, group.name)
                try:
                    existing = client.read_global_concurrency_limit_by_name(name)
                except ObjectNotFound:
                    client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=group.capacity))
                    continue
                if existing.limit != group.capacity or not existing.active:
                    client.update_global_concurrency_limit(
                        name, GlobalConcurrencyLimitUpdate(limit=group.capacity, active=True)
                    )


@dataclass
class GpuSlot:
    """A slot held for a case: where it runs, and its place in the arrival line."""

    placement: Placement
    let_next_case_in: Callable[[], None]  # call once the task is submitted


@contextmanager
def gpu_slot(case: Case, candidates: list[Placement]) -> Iterator[GpuSlot]:
    """Hold one free slot of the first candidate group that has one, taken in arrival order.

    The slot is held from submission until the task is finished or killed. Trying each group
    in turn (instead of queueing on one) lets a case take whichever GPU frees first. The
    slot's lease is renewed while this process lives and recorded in state_dir, so a dead
    process's slot is released by the case's next run or by reconcile.
    """
    state_dir = get_site().settings.state_dir
    release_orphaned_lease(state_dir, case.id)
    key = casework.arrival_key(case)
    with ARRIVAL_LINE.standing(key):
        while True:
            ARRIVAL_LINE.wait_turn(key)
            for placement in candidates:
                lease_id = _take_slot(placement.limit_name)
                if lease_id is not None:
                    break
            else:
                ARRIVAL_LINE.pass_turn(key, found_no_slot=True)
                continue
            ARRIVAL_LINE.step_out(key)
            claims.record_lease(state_dir, case.id, lease_id)
            try:
                with _renewing(lease_id):
                    yield GpuSlot(placement, lambda: ARRIVAL_LINE.pass_turn(key, found_no_slot=False))
            finally:
                ARRIVAL_LINE.pass_turn(key, found_no_slot=False)  # if the submission never came
                _release_lease(lease_id)
                claims.forget_lease(state_dir, case.id)
                ARRIVAL_LINE.slot_given_back()
            return


def _take_slot(limit_name: str) -> str | None:
    """A lease on one slot of the limit, or None when all its slots are taken."""
    response = _post_promptly("/v2/concurrency_limits/increment-with-lease", {
        "names": [limit_name], "slots": 1, "mode": "concurrency", "lease_duration": SLOT_LEASE_SECONDS,
    })
    if response.status_code == 423:  # locked: no free slot
        return None
    response.raise_for_status()
    return str(response.json()["lease_id"])


def _release_lease(lease_id: str) -> None:
    _post_promptly("/v2/concurrency_limits/decrement-with-lease", {"lease_id": lease_id}).raise_for_status()


def _post_promptly(path: str, body: dict) -> httpx.Response:
    """POST to the Prefect API, retrying a busy server after a short pause.

    A Prefect server on SQLite (the embedded default) answers these two calls with 503 when
    another write commits during theirs ("database is locked"; measured: once in most cases),
    and Prefect's client then waits 2 s or more before it tries again: twice per case, on the
    path from the inbox to the GPU and from the GPU to the results. Sent here without that
    back-off; retried after 50 ms, doubling.
    """
    with get_client(sync_client=True) as client:
        http = client._client  # Prefect's httpx client: its own send() adds the long back-off
        for pause_seconds in BUSY_RETRY_SECONDS:
            response = httpx.Client.send(http, http.build_request("POST", path, json=body))
            if response.status_code != 503:
                return response
            time.sleep(pause_seconds * random.uniform(0.5, 1.5))
        return httpx.Client.send(http, http.build_request("POST", path, json=body))


def release_orphaned_lease(state_dir, case_id: int) -> bool:
    """Give back the slot a dead earlier run of this case still holds; True if there was one."""
    lease_id = claims.recorded_lease(state_dir, case_id)
    if lease_id is None:
        return False
    _release_lease(lease_id)  # an expired or unknown lease is simply gone already
    claims.forget_lease(state_dir, case_id)
    return True


@contextmanager
def _renewing(lease_id: str):
    """Renew the lease in the background while the block runs (a crash stops renewing)."""
    stop = threading.Event()

    def renew() -> None:
        while not stop.wait(SLOT_LEASE_SECONDS / 3):
            try:
                with get_client(sync_client=True) as client:
                    client.renew_concurrency_lease(UUID(lease_id), SLOT_LEASE_SECONDS)
            except Exception as exc:  # the server may be briefly away: try again next round
                log.warning("could not renew GPU slot lease %s: %s", lease_id, exc)

    renewer = threading.Thread(target=renew, name=f"slot-lease-{lease_id[:8]}", daemon=True)
    renewer.start()
    try:
        yield
    finally:
        stop.set()
        renewer.join()


def _cell(value: object) -> str:
    return str(value).replace("|", "\\|").replace("\n", "<br>")


def case_resource(case: Case) -> dict[str, str]:
    return {"prefect.resource.id": f"mqi.case.{case.uid}", "prefect.resource.name": case.name,
            "mqi.case.id": str(case.id)}


def emit_state_event(site: Site, case: Case, from_state: CaseState, attempt_id: int | None) -> None:
    """`mqi.case.<state>` for every state change: the case as the resource, host and group related."""
    attempt = site.ledger.get_attempt(attempt_id) if attempt_id is not None else None
    related = []
    if attempt is not None:
        related = [
            {"prefect.resource.id": f"mqi.host.{attempt.host}", "prefect.resource.role": "host"},
            {"prefect.resource.id": f"mqi.group.{attempt.host}.{attempt.group}", "prefect.resource.role": "gpu-group"},
        ]
    emit_event(
        f"mqi.case.{case.state.value}",
        resource=case_resource(case),
        related=related,
        payload={
            "from": from_state.value,
            "attempt": attempt.number if attempt else None,
            "task_id": attempt.task_id if attempt else None,
            "failure_category": case.failure_category.value if case.failure_category else None,
        },
    )


def emit_host_event(health: HostHealth) -> None:
    """`mqi.host.reachable` / `.unreachable` / `.refused` (needs an operator: host key or
    credentials) when a host comes back, goes away, or its problem changes kind."""
    emit_event(
        f"mqi.host.{health.condition}",
        resource={"prefect.resource.id": f"mqi.host.{health.host}", "prefect.resource.name": health.host},
        payload={"reason": health.reason, "needs_operator": health.needs_operator},
    )


def publish_transitions(site: Site) -> None:
    site.ledger.transition_listeners.append(
        lambda case, from_state, attempt_id: emit_state_event(site, case, from_state, attempt_id)
    )
    site.host_listeners.append(emit_host_event)


site_hooks.append(publish_transitions)


@task(name="publish-outcome")
def publish_outcome(case: Case) -> str:
    """A summary artifact of the case in the Prefect UI; returns the case's state."""
    site = get_site()
    case = site.ledger.get_case(case.id)
    attempts = site.ledger.attempts(case.id)
    last = attempts[-1] if attempts else None
    tz = site.settings.tz
    rows = [
        ("case", f"{case.name} (id {case.id}, uid {case.uid})"),
        ("state", case.state.value),
        ("host / group", f"{last.host} / {last.group}" if last else "-"),
        ("pueue task", f"{last.task_id} ({last.label})" if last else "-"),
        ("submitted", local_text(last.submitted_at, tz, "%Y-%m-%d %H:%M:%S %z") if last else "-"),
        ("ended", local_text(last.ended_at, tz, "%Y-%m-%d %H:%M:%S %z") if last else "-"),
        ("result", (last.result.value if last and last.result else "-")),
        ("results", case.results_path or "-"),
        ("failure", f"{case.failure_category}: {case.failure_message}" if case.failure_category else "-"),
    ]
    table = "\n".join(f"| {key} | {_cell(value)} |" for key, value in rows)
    create_markdown_artifact(markdown=f"# Case {case.name}\n\n| | |\n|---|---|\n{table}\n",
                             key=f"case-{case.uid}", description=f"outcome of case {case.name}")
    return case.state.value


def held_slots(settings: Settings) -> dict[tuple[str, str], int]:
    """Active slots of each GPU group's limit, as Prefect counts them."""
    held = {}
    with get_client(sync_client=True) as client:
        for host in settings.hosts:
            for group in host.groups:
                try:
                    limit = client.read_global_concurrency_limit_by_name(gpu_limit_name(host.name, group.name))
                except ObjectNotFound:
                    continue
                held[(host.name, group.name)] = limit.active_slots
    return held
