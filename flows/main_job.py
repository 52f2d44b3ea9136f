"""`mqi run`, the main job: one process scans the inbox and runs every flow run of its
deployments (process-case, scan-inbox, reconcile) in threads of its own.

Why not Prefect's runner (`serve`): it starts each flow run as a new Python process, 2-4 s
and ~90 MB before a case's first step, and an inbox scan every few seconds was a process too.
Here a case starts the moment it is found or a slot frees, all cases share one SSH connection
and one `pueue status` per host, and memory stays that of one process. The runs are still the
deployments' runs: the UI and the API start, follow and cancel them as before.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from uuid import UUID

import watchfiles
from prefect import Flow
from prefect.client.orchestration import SyncPrefectClient
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterDeploymentId,
    FlowRunFilterId,
    FlowRunFilterState,
    FlowRunFilterStateType,
)
from prefect.client.schemas.objects import FlowRun, StateType
from prefect.client.schemas.responses import SetStateStatus
from prefect.flow_engine import run_flow
from prefect.states import Cancelled, Crashed, Pending

from flows.hooks import cancel_remote_task
from flows.process_case import process_case
from flows.reconcile import reconcile
from flows.scan_inbox import scan_inbox
from mqi import casework, stopping
from mqi.inbox import InboxScanner
from mqi.job_answers import JobAnswers
from mqi.ledger.store import CaseNotFound
from mqi.settings_inputs import SettingsInputs
from mqi.site import Site
from tasks.launch import flow_run_name, running_case_ids
from tasks.publish import prompt_client

log = logging.getLogger(__name__)

# How often the job looks for runs started elsewhere (UI, API, automations) and for runs the
# UI asked to cancel; a finished case wakes it at once.
QUERY_SECONDS = 1.0
RECONCILE_MIN_SECONDS = 60.0
# Changes in the inbox within this many milliseconds wake the loop once.
INBOX_DEBOUNCE_MS = 200
# On stop, how long cases may take to leave their steps (an upload under way finishes).
STOP_GRACE_SECONDS = 10.0
# Runs of process-case at once: one holding each slot plus one waiting for it.
CASE_RUNS_PER_SLOT = 2
@dataclass
class RunThread:
    flow_run: FlowRun
    flow: Flow
    thread: threading.Thread
    cancel_requested: bool = False
    arrival_key: tuple | None = None  # a case run: its case's place in the upload order


class MainJob:
    def __init__(self, site: Site, settings_inputs: SettingsInputs | None = None):
        """`settings_inputs`: what the site's settings were read from (default: this process's now)."""
        self.site = site
        self.scanner = InboxScanner(site.settings.inbox)  # one for the job's life: it remembers folders
        self.flows: dict[UUID, Flow] = {}
        self.deployment_of: dict[str, UUID] = {}
        self.runs: dict[UUID, RunThread] = {}
        self.wake = threading.Event()
        self.inbox_changed = threading.Event()
        self._shutdown = threading.Event()
        self._stopping = threading.Event()  # the case threads' waits end when it is set
        self.case_run_limit = casework.total_slots(site) * CASE_RUNS_PER_SLOT
        self.reconcile_every = max(RECONCILE_MIN_SECONDS, site.settings.case.poll_seconds)
        self.answers = JobAnswers(site.ledger, site.settings.tz, settings_inputs or SettingsInputs.of_this_process())
        self._api: SyncPrefectClient | None = None

    @property
    def api(self) -> SyncPrefectClient:
        """The loop's Prefect client, kept between calls: a client per call cost 15 ms of TLS
        set-up and a new connection to the server, several times a second. Replaced after a
        failed call (`close_api`)."""
        if self._api is None:
            self._api = prompt_client()
            self._api.__enter__()
        return self._api

    def close_api(self) -> None:
        if self._api is not None:
            self._api.__exit__(None, None, None)
            self._api = None

    def run(self) -> None:
        """Until stopped (Ctrl-C, SIGTERM, `shutdown`): scan, start, follow cancellations, reconcile."""
        self.register_deployments()
        self.close_runs_of_a_dead_job()
        threading.Thread(target=self._watch_inbox, name="inbox-watch", daemon=True).start()
        try:
            with self.answers:  # `mqi status` and `mqi show` ask this warm process (mqi.job_socket)
                self._serve()
        finally:
            self.stop()
            self.close_api()

    def _serve(self) -> None:
        next_scan = next_reconcile = 0.0
        while not self._shutdown.is_set():
            now = time.monotonic()
            slot_freed = self.forget_finished_runs()
            try:
                if now >= next_reconcile and not self.runs_of(reconcile):  # one at a time
                    self.start_new_run(reconcile, {}, "reconcile")
                    next_reconcile = now + self.reconcile_every
                if now >= next_scan or slot_freed or self.inbox_changed.is_set():
                    self.inbox_changed.clear()
                    self.scan_inbox()
                    next_scan = now + self.site.settings.inbox.scan_seconds
                self.start_runs_from_elsewhere()
                self.cancel_runs_the_ui_cancelled()
            except Exception as exc:  # the server or the ledger briefly away: the next round retries
                log.warning("main job: %s; trying again", exc)
                self.close_api()  # a client that reached the server retries a lost one for a minute
            self.wake.wait(QUERY_SECONDS)
            self.wake.clear()

    def _watch_inbox(self) -> None:
        """A folder created or moved into the inbox wakes the loop at once. The periodic scan
        stays: it sees quiet times end and markers written inside folders, and network shares
        may report no changes at all."""
        inbox = self.site.settings.inbox.path
        try:
            for _ in watchfiles.watch(inbox, recursive=False, debounce=INBOX_DEBOUNCE_MS, step=20,
                                      stop_event=self._shutdown, raise_interrupt=False):
                self.inbox_changed.set()
                self.wake.set()
        except (OSError, RuntimeError) as exc:  # no inbox yet, or no change notification here
            log.info("inbox %s is not watched for changes (%s); scanned every %g s", inbox, exc,
                     self.site.settings.inbox.scan_seconds)

    def shutdown(self) -> None:
        """Ask `run` to stop (from another thread)."""
        self._shutdown.set()
        self.wake.set()

    def register_deployments(self) -> None:
        """The deployments the UI starts runs of; this job starts their scheduled runs itself,
        so any schedule left on them (an older version served them on intervals) is removed."""
        for flow in (process_case, scan_inbox, reconcile):
            deployment_id = flow.to_deployment(name=flow.name).apply()
            for schedule in self.api.read_deployment(deployment_id).schedules:
                self.api.delete_deployment_schedule(deployment_id, schedule.id)
            self.flows[deployment_id] = flow
            self.deployment_of[flow.name] = deployment_id

    def close_runs_of_a_dead_job(self) -> None:
        """Runs this job's deployments show as pending or running now were left by an `mqi run`
        that was killed (only one runs at a time): marked crashed, so the UI does not show them
        running forever. Their cases are resumed by reconcile, which starts first."""
        left = self.api.read_flow_runs(flow_run_filter=FlowRunFilter(
            deployment_id=FlowRunFilterDeploymentId(any_=list(self.flows)),
            state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.PENDING, StateType.RUNNING])),
        ))
        for flow_run in left:
            self._set_state(flow_run.id, Crashed(message="the mqi run that ran it stopped; its case is resumed"))

    # -- starting runs ---------------------------------------------------------------------

    def scan_inbox(self) -> None:
        registered = casework.register_ready_folders(self.site, self.scanner, actor="scan-inbox")
        cases = casework.cases_to_start(self.site, running_case_ids(self.api))
        for case in cases:
            self.start_new_run(process_case, {"case": str(case.id)}, flow_run_name(case))
        if registered or cases:
            log.info("inbox: registered %d new case(s), started %d", registered, len(cases))

    def start_new_run(self, flow: Flow, parameters: dict, name: str) -> None:
        flow_run = self.api.create_flow_run_from_deployment(self.deployment_of[flow.name], parameters=parameters,
                                                            name=name)
        self.start(flow_run)

    def start_runs_from_elsewhere(self) -> None:
        """Runs of our deployments created by the UI, the API, reconcile or an automation."""
        due = self.api.get_scheduled_flow_runs_for_deployments(list(self.flows), scheduled_before=datetime.now(UTC))
        for flow_run in sorted(due, key=lambda r: r.next_scheduled_start_time or r.created):
            if flow_run.id not in self.runs:
                self.start(flow_run)

    def start(self, flow_run: FlowRun) -> None:
        """Run it in a thread of its own."""
        flow = self.flows[flow_run.deployment_id]
        if flow is process_case and self.runs_of(process_case) >= self.case_run_limit:
            return  # stays scheduled; started when a case run ends
        arrival_key = self._arrival_key(flow_run) if flow is process_case else None  # a ledger away: stays scheduled
        if self.api.set_flow_run_state(flow_run.id, Pending()).status is not SetStateStatus.ACCEPT:
            return  # cancelled or taken meanwhile
        thread = threading.Thread(target=self._execute, args=(flow, flow_run), name=f"run-{flow_run.name}",
                                  daemon=True)  # a case that does not stop in time does not hold the exit
        self.runs[flow_run.id] = RunThread(flow_run, flow, thread, arrival_key=arrival_key)
        if arrival_key is not None:
            self.site.expected_arrivals.expect(arrival_key)
        thread.start()

    def _arrival_key(self, flow_run: FlowRun) -> tuple | None:
        """The case's place in the upload order, told to the upload gates before its run starts:
        runs started together reach the gates in whatever order their threads get going."""
        try:
            return casework.arrival_key(self.site.ledger.find_case(str(flow_run.parameters.get("case", ""))))
        except CaseNotFound:  # a folder not registered yet: its run registers it
            return None

    def _execute(self, flow: Flow, flow_run: FlowRun) -> None:
        stopping.stop_this_thread_with(self._stopping)
        try:
            run_flow(flow, flow_run=flow_run, return_type="state")
        except stopping.MainJobStopping:
            pass  # Prefect marked the run crashed; reconcile resumes its case at the next start
        except Exception:
            log.exception("flow run %s ended abnormally", flow_run.name)
        finally:
            self.wake.set()

    def runs_of(self, flow: Flow) -> int:
        return sum(1 for r in self.runs.values() if r.flow is flow)

    def forget_finished_runs(self) -> bool:
        """Drop ended runs; True when a case run ended (its slot may be free for the next case)."""
        ended = [run_id for run_id, run in self.runs.items() if not run.thread.is_alive()]
        case_ended = False
        for run_id in ended:
            run = self.runs.pop(run_id)
            case_ended |= run.flow is process_case
            if run.arrival_key is not None:  # ended without uploading (failed, resumed, stopped)
                self.site.expected_arrivals.arrived(run.arrival_key)
            if run.cancel_requested:
                self._set_state(run_id, Cancelled(message="cancelled from the UI"))
        return case_ended

    # -- cancellation and stopping ---------------------------------------------------------

    def cancel_runs_the_ui_cancelled(self) -> None:
        """A run set to Cancelling (UI, API) has its remote task killed and its case cancelled;
        its thread then sees the task end and finishes, and the run is marked Cancelled."""
        waiting = [run_id for run_id, run in self.runs.items() if not run.cancel_requested]
        if not waiting:
            return
        cancelling = self.api.read_flow_runs(flow_run_filter=FlowRunFilter(
            id=FlowRunFilterId(any_=waiting),
            state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.CANCELLING])),
        ))
        for flow_run in cancelling:
            run = self.runs[flow_run.id]
            run.cancel_requested = True
            if run.flow is process_case:  # the kill waits for confirmation: not in the loop's thread
                threading.Thread(target=cancel_remote_task, args=(run.flow, flow_run, flow_run.state),
                                 name=f"cancel-{flow_run.name}", daemon=True).start()

    def stop(self) -> None:
        """Cases leave their waits; those still busy after the grace are marked crashed. Their
        claims die with this process, so the next start resumes them (never a second task)."""
        self._stopping.set()
        self.close_api()  # the last state changes fail fast if the server is gone (see _set_state)
        deadline = time.monotonic() + STOP_GRACE_SECONDS
        for run in list(self.runs.values()):
            run.thread.join(max(0.0, deadline - time.monotonic()))
        for run_id, run in self.runs.items():
            if run.thread.is_alive():
                self._set_state(run_id, Crashed(message="mqi run stopped; the case resumes when it starts again"))

    def _set_state(self, run_id: UUID, state) -> None:
        try:
            self.api.set_flow_run_state(run_id, state, force=True)
        except Exception as exc:  # the server may be stopping too: the run is reconciled later
            log.warning("could not mark flow run %s %s: %s", run_id, state.name, exc)
            self.close_api()  # a new client does not retry a server it never reached
