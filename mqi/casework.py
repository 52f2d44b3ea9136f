"""The steps of one case, as plain Python: the Prefect tasks are thin wrappers around these.

Every step records what it did in the ledger before it returns, so that a crash at any point
leaves a ledger from which `reconcile` can tell what to do next.
"""

from __future__ import annotations

import logging
import re
import shutil
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
from mqi.ledger.engine import LedgerError
from mqi.ledger.store import CaseMovedOn, folder_key
from mqi.ledger.states import ACTIVE_STATES, AttemptResult, CaseState, FailureCategory
from mqi.queue.base import QueueError, SubmitRequest, TaskInfo, TaskResult, TaskState
from mqi.restarts import explain_kill
from mqi.site import Placement, Site
from mqi.stopping import pause, watching
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
        fault_point("after-register", case.name)
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
    busy = site.ledger.slot_holders()
    return min(usable, key=lambda p: busy.get((p.host.name, p.group.name), 0) / p.group.slots)


def slot_candidates(site: Site, case: Case, chosen: Placement, group: str | None) -> list[Placement]:
    """The groups on the chosen host that may run the case, the chosen (least busy) one first."""
    group = group or case.pinned_group
    if group is not None:
        return [chosen]
    busy = site.ledger.slot_holders()
    others = [site.placement(chosen.host.name, g.name) for g in chosen.host.groups if g.name != chosen.group.name]
    others.sort(key=lambda p: busy.get((p.host.name, p.group.name), 0) / p.group.slots)
    return [chosen, *others]


def wait_for_placement(site: Site, case: Case, host: str | None, group: str | None,
                       sleep: Callable[[float], None] = pause) -> Placement:
    """A case whose hosts are all down waits for one to come back; it does not fail."""
    delay = site.settings.case.poll_seconds
    while True:
        if site.ledger.get_case(case.id).cancel_requested_at is not None:
            raise CaseMovedOn(f"case {case.name} was cancelled while it waited for a host")
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


# -- upload and submit -------------------------------------------------------------------


def upload(site: Site, case: Case, placement: Placement, actor: str) -> bool:
    """Send the case folder to the host, verified; False: an input error failed the case.
    The case stays pending while earlier cases upload to the same host. CaseMovedOn: it was
    cancelled first (also while it waited for its turn)."""
    with watching_for_cancel(site, case), site.upload_gate(placement.host.name).turn(arrival_key(case)):
        return _upload(site, case, placement, actor)


def watching_for_cancel(site: Site, case: Case):
    """The waits of this thread (its turn, a slot, a host) end with CaseMovedOn within one
    poll interval of a cancel."""

    def check() -> None:
        if site.ledger.get_case(case.id).cancel_requested_at is not None:
            raise CaseMovedOn(f"case {case.name} was cancelled while it waited")

    return watching(check, site.settings.case.poll_seconds)


def arrival_key(case: Case) -> tuple:
    """Sorts cases in the order they arrived: uploads, GPU slots and pueue follow it."""
    return case.created_at, case.id


def _upload(site: Site, case: Case, placement: Placement, actor: str) -> bool:
    # The remote folder is named by the case: only an earlier upload of it can have left it there.
    uploaded_before = any(event.to_state is CaseState.UPLOADING for event in site.ledger.events(case.id))
    # The step is taken in the ledger before anything is sent: a cancelled case is refused here.
    moved = site.ledger.transition(case.id, CaseState.UPLOADING, actor=actor, only_from={CaseState.PENDING},
                                   message=f"to {placement.host.name}")
    if moved is None and site.ledger.get_case(case.id).state is not CaseState.UPLOADING:  # else resuming
        raise CaseMovedOn(f"case {case.name} was cancelled before its upload")
    remote_dir = site.remote_case_dir(placement.host, case.uid)
    fault_point("before-upload", case.name)
    try:
        transfer.upload_case(
            site.transport(placement.host.name),
            case.folder,
            remote_dir,
            timeout=site.settings.transfer.timeout_seconds,
            may_be_there=uploaded_before,
        )
        fault_point("after-upload", case.name)
    except transfer.CaseInputError as exc:
        fail_case(site, case, None, FailureCategory.INPUT, str(exc), actor)
        return False
    except TransportError as exc:
        site.note_host_call(placement.host.name, exc)
        # Back in line: the case is retried when the host answers again.
        site.ledger.transition(case.id, CaseState.PENDING, actor=actor, only_from={CaseState.UPLOADING},
                               message=f"upload interrupted: {exc}")
        raise
    return True


# -- admission: a GPU slot, in the ledger ------------------------------------------------


def admit_and_submit(site: Site, case: Case, candidates: list[Placement], actor: str,
                     flow_run_id: str | None = None) -> Attempt:
    """Take a slot of the first candidate group that has one (the ledger's check-and-set), in
    the order the cases of this process arrived, and add the task; the turn passes on once the
    task is in the queue, so each group's queue gets tasks in arrival order. Waits while every
    candidate group is full; CaseMovedOn when the case is cancelled meanwhile."""
    key = arrival_key(case)
    line = site.arrival_line
    with watching_for_cancel(site, case), line.standing(key):
        while True:
            line.wait_turn(key)
            try:
                attempt = _take_first_free_slot(site, case, candidates, flow_run_id)
            except BaseException:
                line.pass_turn(key, found_no_slot=True)
                raise
            if attempt is not None:
                break
            line.pass_turn(key, found_no_slot=True)
        line.step_out(key)
        try:
            return submit(site, case, attempt, actor, resumed=False)
        finally:
            line.pass_turn(key, found_no_slot=False)


def _take_first_free_slot(site: Site, case: Case, candidates: list[Placement],
                          flow_run_id: str | None) -> Attempt | None:
    for placement in candidates:
        attempt = site.ledger.take_slot(
            case.id, host=placement.host.name, group=placement.group.name, capacity=placement.group.capacity,
            label_of=lambda number: attempt_label(case, number),
            remote_dir=site.remote_case_dir(placement.host, case.uid), flow_run_id=flow_run_id,
        )
        if attempt is not None:
            return attempt
    return None


def submit(site: Site, case: Case, attempt: Attempt, actor: str, *, resumed: bool = True) -> Attempt:
    """Add the attempt's task and record it (`queued`). A resumed submission adopts a task that
    already carries the attempt's label (a crash after `pueue add`) instead of adding a second.
    A task added in the instant a cancel came is killed at once, and the kill confirmed."""
    placement = site.placement(attempt.host, attempt.group)
    task_id = site.queue(placement.host.name).submit(_request(site, case, attempt, placement), adopt=resumed)
    fault_point("after-add", case.name)
    site.status(placement.host.name).invalidate()
    try:
        site.ledger.record_submission(attempt.id, task_id, actor=actor,
                                      message=f"pueue task {task_id} in {placement.host.name}/{placement.group.name}")
    except CaseMovedOn:
        log.warning("case %s was cancelled while its task %s was added: killing it", case.name, task_id)
        outcome = site.queue(attempt.host).kill(task_id, attempt.label)
        if not outcome.confirmed:
            log.warning("case %s: kill of task %s not confirmed (%s); reconcile retries it",
                        case.name, task_id, outcome.message)
        raise
    return site.ledger.get_attempt(attempt.id)


def _request(site: Site, case: Case, attempt: Attempt, placement: Placement) -> SubmitRequest:
    output_dir = f"{attempt.remote_dir}/{site.settings.case.output_subdir}"
    env = {"MQI_CASE_UID": case.uid, "MQI_OUTPUT_DIR": output_dir}
    if placement.group.devices is not None:
        env["CUDA_VISIBLE_DEVICES"] = placement.group.devices
    return SubmitRequest(
        label=attempt.label,
        group=placement.group.name,
        workdir=attempt.remote_dir,
        command=site.settings.case.command,
        env=env,
    )


# -- wait --------------------------------------------------------------------------------


@dataclass
class WaitOutcome:
    result: AttemptResult | None  # None: the task vanished; decide from the results on the host
    exit_code: int | None = None
    task: TaskInfo | None = None
    message: str = ""
    moved_on: bool = False  # the case left queued/running meanwhile (a cancel): nothing to record


MOVED_ON = WaitOutcome(None, message="the case was moved on (cancelled) while it waited", moved_on=True)
TIMED_OUT = WaitOutcome(AttemptResult.TIMEOUT, message="timed out")


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
        except CaseMovedOn:
            return MOVED_ON
        finally:
            if self._watched_task is not None:
                self.site.log_tails(self.attempt.host).forget(self._watched_task)

    def _poll_until_done(self) -> WaitOutcome:
        poll = self.site.settings.case.poll_seconds
        backoff = poll
        status = self.site.status(self.attempt.host)
        while True:
            if self._moved_on():  # a cancel is seen within one poll interval
                return MOVED_ON
            if self._host_needs_operator():  # left alone until its next check; a fix recorded
                if (remaining := self._remaining()) <= 0:  # meanwhile (`mqi hosts`) is seen within a poll
                    return TIMED_OUT
                self.sleep(min(poll, remaining))
                continue
            try:
                task = status.snapshot().find(self.attempt.task_id, self.attempt.label)
            except (TransportError, QueueError) as exc:
                refused = isinstance(exc, HostRefused) and self.site.waits_for_operator
                if isinstance(exc, TransportError) and not exc.transient and not refused:
                    raise
                # Unreachable, refused until an operator acts, or pueue not answering sensibly
                # (daemon restarting, output cut short) is not a failure: keep waiting, the
                # timeout clock keeps running.
                if (remaining := self._remaining()) <= 0:
                    return TIMED_OUT
                if refused:
                    log.warning("case %s waits until an operator acts: %s", self.case.uid, exc)
                    self.sleep(min(poll, remaining))
                    continue
                log.warning("case %s: %s; polling again in %.0f s", self.case.uid, exc, backoff)
                self.sleep(min(backoff, remaining))
                backoff = min(backoff * 2, MAX_BACKOFF_SECONDS)
                continue
            backoff = poll
            if task is None:
                return WaitOutcome(None, message="the task vanished from the queue")
            if not self._note_start(task):
                return MOVED_ON
            # A task that ended is judged by how it ended, however late that is seen (the job
            # was down past the deadline): a finished engine's results are not thrown away.
            if task.finished:
                return outcome_of(task)
            if (remaining := self._remaining()) <= 0:  # after _note_start: counted from the start
                return TIMED_OUT
            fault_point("while-waiting", self.case.name)
            self._update_progress(task)
            # Until the snapshot just read is due again, so that the time spent on this round
            # (the status call itself, progress) is not added to the poll interval.
            self.sleep(min(status.seconds_until_stale() or poll, remaining))

    def _host_needs_operator(self) -> bool:
        """The host was refused (key, credentials) and is not due for its next check yet."""
        if not self.site.waits_for_operator:
            return False
        return awaiting_operator(self.site.settings.state_dir, self.attempt.host, now=self.clock())

    def _remaining(self) -> float:
        return (self.deadline - self.clock()).total_seconds()

    def _moved_on(self) -> bool:
        return self.site.ledger.get_case(self.case.id).state not in (CaseState.QUEUED, CaseState.RUNNING)

    def _note_start(self, task: TaskInfo) -> bool:
        """Record when the task started; False when the case was moved on meanwhile."""
        if task.state is TaskState.QUEUED or self.attempt.started_at is not None:
            return True
        if task.start is None and task.state is not TaskState.RUNNING:
            return True
        try:
            self.attempt = self.site.ledger.update_attempt(self.attempt.id, started_at=task.start or self.clock())
        except LedgerError:  # the attempt was finished meanwhile (a confirmed cancel)
            return False
        self.site.ledger.transition(self.case.id, CaseState.RUNNING, actor=self.actor, attempt_id=self.attempt.id,
                                    only_from={CaseState.QUEUED}, message="task started")
        return True

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


def kill(site: Site, case: Case, attempt: Attempt, actor: str, reason: str = "") -> bool:
    """Kill the attempt's task of a case in `killing` and confirm it is gone; the case is then
    cancelled (a cancel was asked for) or failed by its timeout. False: not confirmed, the
    case stays `killing` and the kill is tried again."""
    attempt = site.ledger.get_attempt(attempt.id)  # its run may have recorded the task id meanwhile
    fault_point("before-kill", case.name)
    try:  # by id and label; without an id (a crash right after `pueue add`), by label
        outcome = site.queue(attempt.host).kill(attempt.task_id, attempt.label)
        confirmed, message = outcome.confirmed, outcome.message
    except TransportError as exc:
        confirmed, message = False, str(exc)
    site.status(attempt.host).invalidate()
    if not confirmed:
        log.warning("case %s: kill not confirmed (%s); it will be retried", case.uid, message)
        return False
    settled = site.ledger.confirm_kill(case.id, attempt.id, actor=actor, message=reason or message)
    if settled is not None and settled.state is CaseState.FAILED:
        retry_if_allowed(site, case, FailureCategory.TIMEOUT, actor)
    return True


def kill_until_confirmed(site: Site, case: Case, attempt: Attempt, actor: str, reason: str = "",
                         sleep: Callable[[float], None] = pause) -> None:
    """The run that owns a case in `killing` tries until the kill is confirmed (a host that is
    down is waited for with back-off, like a poll)."""
    delay = site.settings.case.poll_seconds
    while not kill(site, case, attempt, actor, reason):
        sleep(delay)
        delay = min(delay * 2, MAX_BACKOFF_SECONDS)


def cancel(site: Site, case: Case, actor: str, reason: str) -> bool:
    """Record the cancel, then kill the live task, if any, and confirm it. False: the kill is
    not confirmed yet (the case stays `killing`; its run or reconcile tries again).
    Raises CaseFinished for a completed, failed or cancelled case."""
    case, attempt = site.ledger.request_cancel(case.id, actor=actor, reason=reason)
    if attempt is None:
        return True
    return kill(site, case, attempt, actor, reason)


# -- finish ------------------------------------------------------------------------------


def results_dir(site: Site, case: Case) -> Path:
    return site.settings.results_dir.resolve() / case.name


def fetch_results(site: Site, case: Case, attempt: Attempt, actor: str) -> None:
    """Download and verify the results of a case in `downloading`; then it is completed. A
    broken download leaves the case in `downloading` with its attempt live: the results stay on
    the host and the next resume fetches them again."""
    dest = results_dir(site, case)
    dest.parent.mkdir(mode=0o700, parents=True, exist_ok=True)  # results are patient data: owner only
    remote_output = f"{attempt.remote_dir}/{site.settings.case.output_subdir}"
    transport = site.transport(attempt.host)
    fault_point("before-download", case.name)
    try:
        transfer.download_results(transport, remote_output, dest, timeout=site.settings.transfer.timeout_seconds,
                                  case_dir=attempt.remote_dir)
    except transfer.RemoteResultsMissing as exc:  # else resumed and refetched forever
        _fail_without_results(site, case, attempt, str(exc), actor)
        return
    except transfer.ResultsRefused as exc:  # refused again on every refetch; the host's files stay
        task = site.status(attempt.host).snapshot().find(attempt.task_id, attempt.label)  # its exit code, if seen
        fail_case(site, case, attempt, FailureCategory.ENGINE, str(exc), actor,
                  exit_code=task.exit_code if task else None, only_from={CaseState.DOWNLOADING})
        return
    fault_point("after-download", case.name)
    completed = site.ledger.transition(case.id, CaseState.COMPLETED, actor=actor, attempt_id=attempt.id,
                                       only_from={CaseState.DOWNLOADING}, finish=AttemptResult.SUCCESS, exit_code=0,
                                       results_path=dest, message=f"results in {dest}")
    if completed is None:  # cancelled while downloading: its results are not kept
        shutil.rmtree(dest, ignore_errors=True)
        return
    if site.settings.transfer.remove_remote_after_download:
        transfer.remove_remote_dir(transport, attempt.remote_dir)


def _fail_without_results(site: Site, case: Case, attempt: Attempt, missing: str, actor: str) -> None:
    """No results on the host: the queue tells why. A task still listed ended by itself and
    wrote nothing (engine); one that is gone was removed by someone (pueue clean/remove/reset)."""
    task = site.status(attempt.host).snapshot().find(attempt.task_id, attempt.label)
    if task is None:
        fail_case(site, case, attempt, FailureCategory.LOST,
                  f"the task disappeared from the queue (pueue clean/remove/reset?) and left no results: {missing}",
                  actor, result=AttemptResult.LOST, only_from={CaseState.DOWNLOADING})
    else:
        fail_case(site, case, attempt, FailureCategory.ENGINE,
                  f"the engine exited with code 0 but wrote no results: {missing}", actor, exit_code=0,
                  only_from={CaseState.DOWNLOADING})


def fail_case(site: Site, case: Case, attempt: Attempt | None, category: FailureCategory, message: str,
              actor: str, *, result: AttemptResult = AttemptResult.FAILED, exit_code: int | None = None,
              only_from: frozenset[CaseState] | set[CaseState] = ACTIVE_STATES - {CaseState.KILLING},
              host_fault: bool = False) -> None:
    """The case failed (its attempt, if live, ends in the same transaction); retried if allowed.
    Nothing happens if the case has meanwhile left `only_from` (a cancel came first)."""
    failed = site.ledger.transition(
        case.id, CaseState.FAILED, actor=actor, attempt_id=attempt.id if attempt else None,
        finish=result if attempt is not None and attempt.live else None, exit_code=exit_code,
        only_from=only_from, message=message, failure_category=category, failure_message=message,
    )
    if failed is not None:
        retry_if_allowed(site, case, category, actor, host_fault=host_fault)


# Failures the retry policy may try again; an input error never is, a timeout only if set.
RETRYABLE = frozenset({FailureCategory.ENGINE, FailureCategory.INFRASTRUCTURE, FailureCategory.LOST})


def retry_if_allowed(site: Site, case: Case, category: FailureCategory, actor: str, *,
                     host_fault: bool = False) -> bool:
    """Send a failed case back to pending as a new attempt when `retry` allows it;
    `host_fault`: the host ended the task (a pueue daemon restart), retried by default."""
    policy = site.settings.retry
    retryable = category in RETRYABLE or (category is FailureCategory.TIMEOUT and policy.retry_timeouts)
    attempts = len(site.ledger.attempts(case.id))
    allowed = policy.attempts_allowed(host_fault)
    if not retryable or attempts >= allowed:
        return False
    return site.ledger.transition(
        case.id, CaseState.PENDING, actor=actor, only_from={CaseState.FAILED},
        message=f"automatic retry after {category} (attempt {attempts + 1} of {allowed})",
    ) is not None


def engine_failure_message(site: Site, attempt: Attempt, outcome: WaitOutcome) -> str:
    """The exit code and the last lines of the task's log, for the ledger."""
    try:
        tail = site.queue(attempt.host).log_tail(attempt.task_id, attempt.label, lines=site.settings.case.log_tail_lines)
    except (TransportError, MqiError) as exc:
        tail = f"(log not available: {exc})"
    return f"{outcome.message}\n--- last lines of the log ---\n{tail.rstrip()}" if tail.strip() else outcome.message


def wait_for(site: Site, case: Case, attempt: Attempt, actor: str,
             on_progress: Callable[[int], None] = lambda percent: None) -> WaitOutcome:
    """Wait for the attempt's task of a queued or running case, and record how it ended."""
    outcome = Waiter(site, case, attempt, actor, on_progress=on_progress).wait()
    record_outcome(site, case, attempt, outcome, actor)
    return outcome


WAITING = frozenset({CaseState.QUEUED, CaseState.RUNNING})


def record_outcome(site: Site, case: Case, attempt: Attempt, outcome: WaitOutcome, actor: str) -> None:
    """The ledger's next state for how the task ended, each a check-and-set on queued/running:
    a success or a vanished task goes on to `downloading`, a timeout to `killing`, a failure
    or a kill on the host fails the case. The slot is given back in the same transaction."""
    if outcome.moved_on:
        return
    if outcome.result in (AttemptResult.SUCCESS, None):
        note = "fetching results" if outcome.result else "the task vanished from the queue: fetching any results"
        site.ledger.transition(case.id, CaseState.DOWNLOADING, actor=actor, attempt_id=attempt.id,
                               only_from=WAITING, message=note)
    elif outcome.result is AttemptResult.TIMEOUT:
        site.ledger.transition(case.id, CaseState.KILLING, actor=actor, attempt_id=attempt.id, only_from=WAITING,
                               message=f"timed out after {site.settings.case.timeout_hours} h")
    elif outcome.result is AttemptResult.FAILED:
        message = engine_failure_message(site, attempt, outcome)
        category = FailureCategory.ENGINE if outcome.exit_code is not None else FailureCategory.INFRASTRUCTURE
        fail_case(site, case, attempt, category, message, actor, exit_code=outcome.exit_code, only_from=WAITING)
    else:  # killed on the host: by a pueue daemon restart (retried by default), or by someone else
        killed = explain_kill(site, attempt, outcome.task)
        fail_case(site, case, attempt, FailureCategory.INFRASTRUCTURE, killed.message, actor,
                  result=AttemptResult.KILLED, host_fault=killed.by_restart, only_from=WAITING)


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


def kill_stray_tasks(site: Site, host: str) -> list[str]:
    """Kill our tasks that no live attempt owns but that still wait or run on the host: added in
    the instant a cancel came by a run that then died. Evidence: the label names an attempt of
    this ledger that has ended (a label of another ledger is left alone)."""
    notes = []
    for task in site.status(host).snapshot().tasks.values():
        attempt = None if task.finished or not task.label else site.ledger.attempt_by_label(task.label)
        if attempt is None or attempt.live or attempt.host != host:
            continue
        outcome = site.queue(host).kill(task.id, task.label)
        notes.append(f"{host}: task {task.id} ({task.label}) of an ended attempt ({attempt.result}): "
                     f"{'killed' if outcome.confirmed else 'kill not confirmed: ' + outcome.message}")
    if notes:
        site.status(host).invalidate()
    return notes
