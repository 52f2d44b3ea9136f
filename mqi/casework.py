"""The steps of one case, as plain Python: the Prefect tasks are thin wrappers around these.

Every step records what it did in the ledger before it returns, so that a crash at any point
leaves a ledger from which `reconcile` can tell what to do next.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

from mqi import transfer
from mqi.errors import MqiError
from mqi.gpu import cached_gpu_report, foreign_processes
from mqi.host_health import awaiting_operator, host_health, reachable_hosts
from mqi.inbox import InboxScanner
from mqi.faults import fault_point
from mqi.ledger.records import Attempt, Case
from mqi.ledger.store import folder_key
from mqi.ledger.states import ACTIVE_STATES, AttemptResult, CaseState, FailureCategory
from mqi.queue.base import QueueError, SubmitRequest, TaskInfo, TaskResult, TaskState
from mqi.site import Placement, Site
from mqi.stopping import pause
from mqi.transport.base import HostRefused, TransportError

log = logging.getLogger(__name__)

MAX_BACKOFF_SECONDS = 300.0


def attempt_label(case: Case, number: int) -> str:
    return f"mqi-{case.uid}-a{number}"


# -- register and place ------------------------------------------------------------------


def register(site: Site, ref: str, actor: str) -> Case:
    """The case for a folder path (registered if new), an id or a uid."""
    path = Path(ref).expanduser()
    if path.is_dir():
        case, _ = site.ledger.register_case(path.resolve(), actor=actor)
        fault_point("after-register")
        return case
    return site.ledger.find_case(ref)


class NoPlacement(MqiError):
    """No configured group can take the case now (hosts down, or GPUs busy with others' work)."""


def choose_placement(site: Site, case: Case, host: str | None = None, group: str | None = None) -> Placement:
    """The least busy usable group (live attempts per slot), honouring any pin."""
    host = host or case.pinned_host
    group = group or case.pinned_group
    configured = [
        site.placement(h.name, g.name)
        for h in site.settings.hosts
        if host is None or h.name == host
        for g in h.groups
        if group is None or g.name == group
    ]
    if not configured:
        raise MqiError(f"no configured group matches host={host!r} group={group!r}")
    reachable = reachable_hosts(site.settings.state_dir, {p.host.name for p in configured})
    usable = [p for p in configured if p.host.name in reachable and not _gpus_taken_by_others(site, p)]
    if not usable and not site.waits_for_operator:  # the user at the terminal hears the host's answer now
        usable = [p for p in configured if host_health(site.settings.state_dir, p.host.name).needs_operator]
    if not usable:
        reasons = sorted({f"{p.host.name}: {host_health(site.settings.state_dir, p.host.name).reason or 'GPUs busy'}"
                          for p in configured})
        raise NoPlacement(f"no usable group for case {case.name} now ({'; '.join(reasons)})")
    busy = live_attempts_per_group(site)
    return min(usable, key=lambda p: busy.get((p.host.name, p.group.name), 0) / p.group.slots)


def slot_candidates(site: Site, case: Case, chosen: Placement, group: str | None) -> list[Placement]:
    """The groups on the chosen host that may run the case, the chosen (least busy) one first."""
    group = group or case.pinned_group
    if group is not None:
        return [chosen]
    busy = live_attempts_per_group(site)
    others = [site.placement(chosen.host.name, g.name) for g in chosen.host.groups if g.name != chosen.group.name]
    others.sort(key=lambda p: busy.get((p.host.name, p.group.name), 0) / p.group.slots)
    return [chosen, *others]


def wait_for_placement(site: Site, case: Case, host: str | None, group: str | None,
                       sleep: Callable[[float], None] = pause) -> Placement:
    """A case whose hosts are all down waits for one to come back; it does not fail."""
    delay = site.settings.case.poll_seconds
    while True:
        try:
            return choose_placement(site, case, host, group)
        except NoPlacement as exc:
            log.warning("%s; trying again in %.0f s", exc, delay)
            sleep(delay)
            delay = min(delay * 2, MAX_BACKOFF_SECONDS)


def _gpus_taken_by_others(site: Site, placement: Placement) -> bool:
    if not placement.host.avoid_foreign_gpu_processes:
        return False
    try:
        report = cached_gpu_report(site.gpu_cache, site.transport(placement.host.name),
                                   placement.host.nvidia_smi, placement.host.command_timeout)
    except TransportError as exc:
        site.note_host_call(placement.host.name, exc)
        return True
    return bool(foreign_processes(report, placement.group.devices))


def live_attempts_per_group(site: Site) -> dict[tuple[str, str], int]:
    counts: dict[tuple[str, str], int] = {}
    for active in site.ledger.cases_in_states(ACTIVE_STATES):
        attempt = site.ledger.live_attempt(active.id)
        if attempt is not None:
            counts[(attempt.host, attempt.group)] = counts.get((attempt.host, attempt.group), 0) + 1
    return counts


# -- upload and submit -------------------------------------------------------------------


def upload(site: Site, case: Case, placement: Placement, actor: str) -> bool:
    """Send the case folder to the host, verified; False: an input error failed the case.
    The case stays pending while earlier cases upload to the same host."""
    with site.upload_gate(placement.host.name).turn(arrival_key(case)):
        return _upload(site, case, placement, actor)


def arrival_key(case: Case) -> tuple:
    """Sorts cases in the order they arrived: uploads, GPU slots and pueue follow it."""
    return case.created_at, case.id


def _upload(site: Site, case: Case, placement: Placement, actor: str) -> bool:
    # The remote folder is named by the case: only an earlier upload of it can have left it there.
    uploaded_before = any(event.to_state is CaseState.UPLOADING for event in site.ledger.events(case.id))
    if site.ledger.get_case(case.id).state is not CaseState.UPLOADING:  # else resuming a broken upload
        site.ledger.transition(case.id, CaseState.UPLOADING, actor=actor, message=f"to {placement.host.name}")
    remote_dir = site.remote_case_dir(placement.host, case.uid)
    try:
        transfer.upload_case(
            site.transport(placement.host.name),
            case.folder,
            remote_dir,
            timeout=site.settings.transfer.timeout_seconds,
            may_be_there=uploaded_before,
        )
        fault_point("after-upload")
    except transfer.CaseInputError as exc:
        fail_case(site, case, None, FailureCategory.INPUT, str(exc), actor)
        return False
    except TransportError as exc:
        site.note_host_call(placement.host.name, exc)
        # Back in line: the case is retried when the host answers again.
        site.ledger.transition(case.id, CaseState.PENDING, actor=actor, message=f"upload interrupted: {exc}")
        raise
    return True


def submit(site: Site, case: Case, placement: Placement, actor: str, flow_run_id: str | None = None) -> Attempt:
    """Add the pueue task (adopting one with the same label) and record it."""
    live = site.ledger.live_attempt(case.id)
    if live is not None:  # a retried step: the attempt exists, its task is found by label
        return add_task(site, case, live, placement, actor)
    number = len(site.ledger.attempts(case.id)) + 1
    label = attempt_label(case, number)
    remote_dir = site.remote_case_dir(placement.host, case.uid)
    # The attempt is written before `pueue add`, so a crash in between leaves its label in the
    # ledger and the task is adopted by label instead of added twice.
    attempt = site.ledger.start_attempt(
        case.id,
        host=placement.host.name,
        group=placement.group.name,
        label=label,
        remote_dir=remote_dir,
        flow_run_id=flow_run_id,
    )
    # Its label is new (attempt numbers only grow): no task can carry it, no status to read first.
    return add_task(site, case, attempt, placement, actor, resumed=False)


def add_task(site: Site, case: Case, attempt: Attempt, placement: Placement, actor: str, *,
             resumed: bool = True) -> Attempt:
    """Add the attempt's task; a resumed submission adopts a task that already has its label."""
    output_dir = f"{attempt.remote_dir}/{site.settings.case.output_subdir}"
    env = {"MQI_CASE_UID": case.uid, "MQI_OUTPUT_DIR": output_dir}
    if placement.group.devices is not None:
        env["CUDA_VISIBLE_DEVICES"] = placement.group.devices
    request = SubmitRequest(
        label=attempt.label,
        group=placement.group.name,
        workdir=attempt.remote_dir,
        command=site.settings.case.command,
        env=env,
    )
    task_id = site.queue(placement.host.name).submit(request, adopt=resumed)
    fault_point("after-add")
    site.status(placement.host.name).invalidate()
    attempt = site.ledger.update_attempt(attempt.id, task_id=task_id)
    site.ledger.transition(
        case.id,
        CaseState.QUEUED,
        actor=actor,
        attempt_id=attempt.id,
        message=f"pueue task {task_id} in {placement.host.name}/{placement.group.name}",
    )
    return attempt


# -- wait --------------------------------------------------------------------------------


@dataclass
class WaitOutcome:
    result: AttemptResult | None  # None: the task vanished; decide from the results on the host
    exit_code: int | None = None
    task: TaskInfo | None = None
    message: str = ""


@dataclass
class Waiter:
    """Polls one attempt until its task ends, the deadline passes, or it vanishes."""

    site: Site
    case: Case
    attempt: Attempt
    actor: str
    on_progress: Callable[[int], None] = lambda percent: None
    sleep: Callable[[float], None] = pause
    clock: Callable[[], datetime] = lambda: datetime.now(timezone.utc)
    _last_percent: int | None = field(default=None, init=False)
    _watched_task: int | None = field(default=None, init=False)

    @property
    def deadline(self) -> datetime:
        """The engine gets timeout_hours from its start. Before it starts, a task queued ahead
        may wait behind the group's running and earlier queued tasks, each held to the same limit."""
        limit = timedelta(hours=self.site.settings.case.timeout_hours)
        if self.attempt.started_at is not None:
            return self.attempt.started_at + limit
        group = self.site.placement(self.attempt.host, self.attempt.group).group
        return self.attempt.submitted_at + limit * (1 + group.queue_ahead)

    def wait(self) -> WaitOutcome:
        try:
            return self._poll_until_done()
        finally:
            if self._watched_task is not None:
                self.site.log_tails(self.attempt.host).forget(self._watched_task)

    def _poll_until_done(self) -> WaitOutcome:
        poll = self.site.settings.case.poll_seconds
        backoff = poll
        status = self.site.status(self.attempt.host)
        while True:
            remaining = (self.deadline - self.clock()).total_seconds()
            if remaining <= 0:
                return WaitOutcome(AttemptResult.TIMEOUT, message="timed out")
            if self._host_needs_operator():  # left alone until its next check; a fix recorded
                self.sleep(min(poll, remaining))  # meanwhile (`mqi hosts`) is seen within a poll
                continue
            try:
                task = status.snapshot().find(self.attempt.task_id, self.attempt.label)
            except (TransportError, QueueError) as exc:
                if isinstance(exc, HostRefused) and self.site.waits_for_operator:
                    log.warning("case %s waits until an operator acts: %s", self.case.uid, exc)
                    self.sleep(min(poll, remaining))
                    continue
                if isinstance(exc, TransportError) and not exc.transient:
                    raise
                # Unreachable, or pueue not answering sensibly (daemon restarting, output cut
                # short) is not a failure: keep waiting, the timeout clock keeps running.
                log.warning("case %s: %s; polling again in %.0f s", self.case.uid, exc, backoff)
                self.sleep(min(backoff, remaining))
                backoff = min(backoff * 2, MAX_BACKOFF_SECONDS)
                continue
            backoff = poll
            if task is None:
                return WaitOutcome(None, message="the task vanished from the queue")
            self._note_start(task)
            if task.finished:
                return outcome_of(task)
            fault_point("while-waiting")
            self._update_progress(task)
            # Until the snapshot just read is due again, so that the time spent on this round
            # (the status call itself, progress) is not added to the poll interval.
            self.sleep(min(status.seconds_until_stale() or poll, remaining))

    def _host_needs_operator(self) -> bool:
        """The host was refused (key, credentials) and is not due for its next check yet."""
        if not self.site.waits_for_operator:
            return False
        return awaiting_operator(self.site.settings.state_dir, self.attempt.host, now=self.clock())

    def _note_start(self, task: TaskInfo) -> None:
        if task.state is TaskState.QUEUED or self.attempt.started_at is not None:
            return
        if task.start is None and task.state is not TaskState.RUNNING:
            return
        self.attempt = self.site.ledger.update_attempt(self.attempt.id, started_at=task.start or self.clock())
        if self.site.ledger.get_case(self.case.id).state is CaseState.QUEUED:
            self.site.ledger.transition(
                self.case.id, CaseState.RUNNING, actor=self.actor, attempt_id=self.attempt.id, message="task started"
            )

    def _update_progress(self, task: TaskInfo) -> None:
        if task.state is not TaskState.RUNNING:
            return
        tails = self.site.log_tails(self.attempt.host)
        tails.watch(task.id, self.attempt.label)
        self._watched_task = task.id
        tail = tails.tail(task.id)  # one read for all the host's running cases, shared
        percent = None if tail is None else parse_progress(tail, self.site.settings.case.progress_pattern)
        if percent is not None and percent != self._last_percent:
            self._last_percent = percent
            self.site.ledger.set_progress(self.case.id, percent)
            self.on_progress(percent)


def parse_progress(text: str, pattern: str) -> int | None:
    """Percent from the last progress line in `text` (done of total), if any."""
    matches = re.findall(pattern, text)
    if not matches:
        return None
    done, total = (int(x) for x in matches[-1])
    return max(0, min(100, round(100 * done / total))) if total else None


def outcome_of(task: TaskInfo) -> WaitOutcome:
    if task.result is TaskResult.SUCCESS:
        return WaitOutcome(AttemptResult.SUCCESS, exit_code=0, task=task)
    if task.result is TaskResult.KILLED:
        return WaitOutcome(AttemptResult.KILLED, task=task, message="the task was killed on the host")
    if task.result is TaskResult.FAILED:
        return WaitOutcome(AttemptResult.FAILED, exit_code=task.exit_code, task=task,
                           message=f"the engine exited with code {task.exit_code}")
    reason = task.spawn_error or str(task.result)
    return WaitOutcome(AttemptResult.FAILED, task=task, message=f"the task could not run: {reason}")


# -- kill --------------------------------------------------------------------------------


def kill(site: Site, case: Case, attempt: Attempt, result: AttemptResult, reason: str, actor: str) -> bool:
    """Kill the attempt's task and confirm it is gone; False leaves the case in `killing`."""
    if site.ledger.get_case(case.id).state is not CaseState.KILLING:
        site.ledger.transition(case.id, CaseState.KILLING, actor=actor, attempt_id=attempt.id, message=reason)
    if attempt.task_id is None:
        confirmed, message = True, "no task had been added"
    else:
        try:
            outcome = site.queue(attempt.host).kill(attempt.task_id, attempt.label)
            confirmed, message = outcome.confirmed, outcome.message
        except TransportError as exc:
            confirmed, message = False, str(exc)
    site.status(attempt.host).invalidate()
    if not confirmed:
        log.warning("case %s: kill not confirmed (%s); it will be retried", case.uid, message)
        return False
    site.ledger.finish_attempt(attempt.id, result)
    if result is AttemptResult.CANCELLED:
        site.ledger.transition(case.id, CaseState.CANCELLED, actor=actor, attempt_id=attempt.id, message=reason)
    else:
        category = FailureCategory.TIMEOUT if result is AttemptResult.TIMEOUT else FailureCategory.INFRASTRUCTURE
        site.ledger.transition(
            case.id, CaseState.FAILED, actor=actor, attempt_id=attempt.id, message=reason,
            failure_category=category, failure_message=reason,
        )
        retry_if_allowed(site, case, category, actor)
    return True


# -- finish ------------------------------------------------------------------------------


def results_dir(site: Site, case: Case) -> Path:
    return site.settings.results_dir.resolve() / case.name


def download(site: Site, case: Case, attempt: Attempt, actor: str) -> Path:
    """Fetch and verify the results, then mark the case completed."""
    if site.ledger.get_case(case.id).state is not CaseState.DOWNLOADING:
        site.ledger.transition(case.id, CaseState.DOWNLOADING, actor=actor, attempt_id=attempt.id,
                               message="fetching results")
    dest = results_dir(site, case)
    dest.parent.mkdir(mode=0o700, parents=True, exist_ok=True)  # results are patient data: owner only
    remote_output = f"{attempt.remote_dir}/{site.settings.case.output_subdir}"
    transport = site.transport(attempt.host)
    # A broken download leaves the case in `downloading` with its attempt live; the results
    # stay on the host and the next resume fetches them again.
    transfer.download_results(transport, remote_output, dest, timeout=site.settings.transfer.timeout_seconds)
    fault_point("after-download")
    site.ledger.finish_attempt(attempt.id, AttemptResult.SUCCESS, exit_code=0)
    site.ledger.transition(case.id, CaseState.COMPLETED, actor=actor, attempt_id=attempt.id,
                           results_path=dest, message=f"results in {dest}")
    if site.settings.transfer.remove_remote_after_download:
        transfer.remove_remote_dir(transport, attempt.remote_dir)
    return dest


def fail_case(site: Site, case: Case, attempt: Attempt | None, category: FailureCategory, message: str,
              actor: str, *, result: AttemptResult = AttemptResult.FAILED, exit_code: int | None = None) -> None:
    if attempt is not None and attempt.live:
        site.ledger.finish_attempt(attempt.id, result, exit_code=exit_code)
    site.ledger.transition(
        case.id, CaseState.FAILED, actor=actor, attempt_id=attempt.id if attempt else None,
        message=message, failure_category=category, failure_message=message,
    )
    retry_if_allowed(site, case, category, actor)


# Failures the retry policy may try again; an input error never is, a timeout only if set.
RETRYABLE = frozenset({FailureCategory.ENGINE, FailureCategory.INFRASTRUCTURE, FailureCategory.LOST})


def retry_if_allowed(site: Site, case: Case, category: FailureCategory, actor: str) -> bool:
    """Send a failed case back to pending as a new attempt when `retry` allows it."""
    policy = site.settings.retry
    retryable = category in RETRYABLE or (category is FailureCategory.TIMEOUT and policy.retry_timeouts)
    attempts = len(site.ledger.attempts(case.id))
    if not retryable or attempts >= policy.max_attempts:
        return False
    site.ledger.transition(case.id, CaseState.PENDING, actor=actor,
                           message=f"automatic retry after {category} (attempt {attempts + 1} of {policy.max_attempts})")
    return True


def engine_failure_message(site: Site, attempt: Attempt, outcome: WaitOutcome) -> str:
    """The exit code and the last lines of the task's log, for the ledger."""
    try:
        tail = site.queue(attempt.host).log_tail(attempt.task_id, attempt.label, lines=site.settings.case.log_tail_lines)
    except (TransportError, MqiError) as exc:
        tail = f"(log not available: {exc})"
    return f"{outcome.message}\n--- last lines of the log ---\n{tail.rstrip()}" if tail.strip() else outcome.message


def is_active(case: Case) -> bool:
    return case.state in ACTIVE_STATES


def wait_for(site: Site, case: Case, attempt: Attempt, actor: str,
             on_progress: Callable[[int], None] = lambda percent: None) -> WaitOutcome:
    """Wait for the attempt's task; a timeout kills it. Resumes `downloading` and `killing`."""
    state = site.ledger.get_case(case.id).state
    if state is CaseState.DOWNLOADING:  # the task had succeeded before a crash
        return WaitOutcome(AttemptResult.SUCCESS, exit_code=0)
    if state is CaseState.KILLING:  # a kill that was never confirmed
        kill(site, case, attempt, AttemptResult.TIMEOUT, "kill retried", actor)
        return WaitOutcome(AttemptResult.TIMEOUT, message="killed")
    outcome = Waiter(site, case, attempt, actor, on_progress=on_progress).wait()
    if outcome.result is AttemptResult.TIMEOUT:
        kill(site, case, attempt, AttemptResult.TIMEOUT, f"timed out after {site.settings.case.timeout_hours} h", actor)
    return outcome


def record_outcome(site: Site, case: Case, attempt: Attempt, outcome: WaitOutcome, actor: str) -> Case:
    """Download on success, or record why the attempt failed. Idempotent on a settled case."""
    current = site.ledger.get_case(case.id)
    if current.state not in ACTIVE_STATES or current.state is CaseState.KILLING:
        return current  # already settled (kill, cancel) or waiting for a kill to be confirmed
    attempt = site.ledger.get_attempt(attempt.id)
    if outcome.result is AttemptResult.SUCCESS:
        try:
            download(site, case, attempt, actor)
        except transfer.RemoteResultsMissing as exc:  # else resumed and refetched forever
            fail_case(site, case, attempt, FailureCategory.ENGINE,
                      f"the engine exited with code 0 but wrote no results: {exc}", actor, exit_code=0)
    elif outcome.result is None:
        decide_vanished(site, case, attempt, actor)
    elif outcome.result is AttemptResult.FAILED:
        message = engine_failure_message(site, attempt, outcome)
        category = FailureCategory.ENGINE if outcome.exit_code is not None else FailureCategory.INFRASTRUCTURE
        fail_case(site, case, attempt, category, message, actor, exit_code=outcome.exit_code)
    else:  # killed on the host by someone else, or by a pueue daemon restart
        fail_case(site, case, attempt, FailureCategory.INFRASTRUCTURE,
                  "the task was killed on the host (an operator, or a pueue daemon restart)", actor,
                  result=AttemptResult.KILLED)
    return site.ledger.get_case(case.id)


def decide_vanished(site: Site, case: Case, attempt: Attempt, actor: str) -> None:
    """A task removed from the queue before we saw it end: decided from the host's results."""
    try:
        download(site, case, attempt, actor)
    except transfer.RemoteResultsMissing:
        fail_case(site, case, attempt, FailureCategory.LOST,
                  "the task disappeared from the queue (pueue clean/remove/reset?) and left no results",
                  actor, result=AttemptResult.LOST)


def cancel(site: Site, case: Case, actor: str, reason: str) -> bool:
    """Kill the live task, if any, and mark the case cancelled. False: kill not confirmed."""
    attempt = site.ledger.live_attempt(case.id)
    if attempt is None:
        if site.ledger.get_case(case.id).state is not CaseState.CANCELLED:
            site.ledger.transition(case.id, CaseState.CANCELLED, actor=actor, message=reason)
        return True
    return kill(site, case, attempt, AttemptResult.CANCELLED, reason, actor)


# -- admission and reconciliation ----------------------------------------------------------


def register_ready_folders(site: Site, scanner: InboxScanner, actor: str) -> int:
    """Complete inbox folders the ledger does not know yet become pending cases; how many."""
    known = site.ledger.sources()  # every scan: all cases' folders, not all cases
    new = 0
    for ready in scanner.scan(known=lambda path: folder_key(path) in known).ready:
        _, created = site.ledger.register_case(ready.path, actor=actor)
        new += created
    return new


def total_slots(site: Site) -> int:
    """Cases that may hold GPU groups at once (slots plus the cases queued ahead)."""
    return sum(g.capacity for h in site.settings.hosts for g in h.groups)


def cases_to_start(site: Site, launched: set[int]) -> list[Case]:
    """Pending cases to start now, oldest first: only as many as there are free slots.

    `launched` holds the ids of cases whose process-case run exists and has not ended; they
    count against the slots whether they wait for a slot or hold one.
    """
    active = [c for c in site.ledger.cases_in_states(ACTIVE_STATES)]
    busy = sum(1 for c in active if c.state is not CaseState.PENDING or c.id in launched)
    free = max(0, total_slots(site) - busy)
    waiting = sorted((c for c in active if c.state is CaseState.PENDING and c.id not in launched),
                     key=lambda c: (c.created_at, c.id))
    return waiting[:free]


def orphaned_cases(site: Site, live_flow_runs: set[int]) -> list[Case]:
    """Cases past pending whose process-case run is gone (crash, reboot): to be resumed."""
    return [c for c in site.ledger.cases_in_states(ACTIVE_STATES)
            if c.state is not CaseState.PENDING and c.id not in live_flow_runs]


def adopt_unknown_tasks(site: Site, host: str, actor: str) -> list[str]:
    """Record task ids of our labelled tasks that the ledger lacks (crash after `pueue add`)."""
    notes = []
    snapshot = site.status(host).snapshot()
    for active in site.ledger.cases_in_states(ACTIVE_STATES):
        attempt = site.ledger.live_attempt(active.id)
        if attempt is None or attempt.host != host or attempt.task_id is not None:
            continue
        task = snapshot.find(None, attempt.label)
        if task is not None:
            site.ledger.update_attempt(attempt.id, task_id=task.id)
            notes.append(f"case {active.name}: adopted pueue task {task.id} ({attempt.label})")
    return notes
