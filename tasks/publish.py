"""What the Prefect UI and automations see of a case: GPU limits, a summary, events."""

from __future__ import annotations

import logging
import threading
import time

import httpx
from prefect import get_client, task
from prefect.artifacts import create_markdown_artifact
from prefect.client.orchestration import SyncPrefectClient
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate, GlobalConcurrencyLimitUpdate
from prefect.events import emit_event
from prefect.exceptions import ObjectNotFound

from mqi.host_health import HostHealth
from mqi.ledger.records import Case
from mqi.ledger.states import CaseState
from mqi.runtime import get_site, site_hooks
from mqi.site import Site, gpu_limit_name
from mqi.timefmt import local_text

log = logging.getLogger(__name__)

# A Prefect server on SQLite answers a write that collides with another with 503 ("database
# is locked"); Prefect's client then waits 2 s or more. The collision is over in milliseconds.
BUSY_RETRY_AFTER_SECONDS = 0.1


def retry_soon_when_busy(response: httpx.Response) -> None:
    """An httpx response hook: a 503 without Retry-After gets a short one, which Prefect's
    client honours instead of its back-off."""
    if response.status_code == 503 and "Retry-After" not in response.headers:
        response.headers["Retry-After"] = str(BUSY_RETRY_AFTER_SECONDS)


PROMPT_CLIENT_SETTINGS = {"event_hooks": {"response": [retry_soon_when_busy]}}


def prompt_client() -> SyncPrefectClient:
    """A Prefect client that tries a busy server again after 0.1 s (enter it with `with`)."""
    return get_client(sync_client=True, httpx_settings=PROMPT_CLIENT_SETTINGS)


def repair_gpu_limits(site: Site) -> list[str]:
    """Make each GPU group's Prefect global concurrency limit what the ledger says: limit =
    slots + queue_ahead, active slots = the slots the ledger's attempts hold. Created if
    missing. The limits are what the UI shows; a server restart, a lost lease or a dead
    holder never leaves a GPU counted as taken beyond the next repair. Returns what it fixed."""
    held = site.ledger.slot_holders()
    notes = []
    with prompt_client() as client:
        for host in site.settings.hosts:
            for group in host.groups:
                name, want = gpu_limit_name(host.name, group.name), held.get((host.name, group.name), 0)
                try:
                    existing = client.read_global_concurrency_limit_by_name(name)
                except ObjectNotFound:
                    client.create_global_concurrency_limit(
                        GlobalConcurrencyLimitCreate(name=name, limit=group.capacity, active_slots=want))
                    continue
                if (existing.limit, existing.active, existing.active_slots) != (group.capacity, True, want):
                    client.update_global_concurrency_limit(name, GlobalConcurrencyLimitUpdate(
                        limit=group.capacity, active=True, active_slots=want))
                if existing.active_slots != want:
                    notes.append(f"{host.name}/{group.name}: Prefect counted {existing.active_slots} GPU slot(s) "
                                 f"held, the ledger {want}: repaired")
    return notes


# After a failed write (the server away, restarting or busy), the pauses before the groups
# are written again; the last one repeats while the server stays away.
MIRROR_RETRY_SECONDS = (0.5, 1.0, 2.0, 5.0)


class LimitMirror:
    """Shows the ledger's slot counts in the Prefect limits as they change, from a thread of
    its own: a case never waits for Prefect to take or give back a slot. Changes that come
    together are written once; a failed write is tried again until the server takes it, so
    a server that was away or busy shows the ledger's counts within seconds of answering
    again, not at the next reconcile."""

    def __init__(self, site: Site):
        self._site = site
        self._changed: set[tuple[str, str]] = set()
        self._wake = threading.Condition()
        threading.Thread(target=self._run, name="gpu-limit-mirror", daemon=True).start()

    def slot_changed(self, host: str, group: str) -> None:
        with self._wake:
            self._changed.add((host, group))
            self._wake.notify()

    def _run(self) -> None:
        client = None  # kept between writes: a new client costs some 15 ms of TLS set-up
        failures = 0
        while True:
            with self._wake:
                while not self._changed:
                    self._wake.wait()
                changed, self._changed = self._changed, set()
            try:
                client = client or prompt_client().__enter__()
                held = self._site.ledger.slot_holders()  # read now: a retry writes the counts of its time
                for host, group in sorted(changed):
                    client.update_global_concurrency_limit(
                        gpu_limit_name(host, group), GlobalConcurrencyLimitUpdate(active_slots=held.get((host, group), 0)))
            except Exception as exc:  # the server may be away or busy: written again after a pause
                if not failures:
                    log.warning("could not show GPU slots in Prefect's limits: %s; trying again", exc)
                if client is not None:  # a client that reached the server retries a lost one for a minute
                    client.__exit__(None, None, None)
                    client = None
                with self._wake:
                    self._changed |= changed
                time.sleep(MIRROR_RETRY_SECONDS[min(failures, len(MIRROR_RETRY_SECONDS) - 1)])
                failures += 1
            else:
                if failures:
                    log.info("GPU slots shown in Prefect's limits again")
                failures = 0


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
    """Every Site of a process (`mqi run`, `mqi submit`, a worker's flow run) shows its cases
    and slots in Prefect, starting with limits repaired from the ledger."""
    site.ledger.transition_listeners.append(
        lambda case, from_state, attempt_id: emit_state_event(site, case, from_state, attempt_id)
    )
    site.ledger.slot_listeners.append(LimitMirror(site).slot_changed)
    site.host_listeners.append(emit_host_event)
    try:
        for note in repair_gpu_limits(site):
            log.warning("%s", note)
    except Exception as exc:  # Prefect away: admission does not need it, the next repair puts it right
        log.warning("could not repair the GPU limits in Prefect: %s", exc)


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


