"""A GPU server's pueue daemon restart, put right without a person (rule: mqi.queue.restart).

Two places meet the marks a restart leaves. When a task of ours ended Killed, the case step
that records it asks `explain_kill`: killed by the restart, the case is an infrastructure
failure the retry policy runs again (`retry.infrastructure_attempts`); killed by someone else,
it is not retried beyond `retry.max_attempts`. Reconcile asks `check_paused_groups` for each
host: a group the restart paused that holds our queued tasks is started again; one a person
paused is left paused, its cause kept for `mqi hosts` and announced once.

The daemon's start is read from the host only here, when one of these marks is seen: never
per poll.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from mqi.group_sightings import group_records, note_pause_cause
from mqi.ledger.records import Attempt
from mqi.ledger.states import ACTIVE_STATES
from mqi.queue.base import DaemonStart, QueueError, QueueSnapshot, TaskInfo, TaskState
from mqi.queue.restart import Cause, Verdict, kill_cause, pause_cause
from mqi.site import Site
from mqi.timefmt import utc_now
from mqi.transport.base import TransportError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class KilledTask:
    verdict: Verdict

    @property
    def by_restart(self) -> bool:
        return self.verdict.by_restart

    @property
    def message(self) -> str:
        """For the ledger's failure message."""
        how = "by a restart of the pueue daemon" if self.by_restart else "on the host, not by a pueue daemon restart"
        return f"the task was killed {how}: {self.verdict.why}"


def explain_kill(site: Site, attempt: Attempt, task: TaskInfo | None) -> KilledTask:
    """Why the attempt's task ended Killed: a daemon restart, or someone else."""
    if task is None:
        return KilledTask(Verdict(Cause.OPERATOR, "the killed task was not seen"))
    try:
        daemon = site.queue(attempt.host).daemon_start()
        host_tasks = list(site.status(attempt.host).snapshot().tasks.values())
    except (TransportError, QueueError) as exc:
        log.warning("host %s: cannot tell whether its pueue daemon restarted: %s", attempt.host, exc)
        daemon, host_tasks = None, []
    return KilledTask(kill_cause(task, daemon and daemon.started_at, host_tasks))


@dataclass(frozen=True)
class PausedGroup:
    """A paused group of a host that holds our queued tasks, and what was done about it."""

    host: str
    group: str
    verdict: Verdict
    waiting: int  # our tasks queued in it
    announce: bool  # a person's pause not announced before

    @property
    def note(self) -> str:
        if self.verdict.by_restart:
            return f"{self.host}/{self.group}: started again, paused by a pueue daemon restart ({self.verdict.why})"
        return (f"{self.host}/{self.group}: left paused with {self.waiting} case(s) waiting, not paused by a "
                f"daemon restart ({self.verdict.why}); `pueue start --group {self.group}` resumes it")


def check_paused_groups(site: Site, host: str) -> list[PausedGroup]:
    """Start the host's groups that a daemon restart paused and that hold our queued tasks;
    leave those a person paused, keeping the cause. Raises TransportError / QueueError."""
    snapshot = site.status(host).snapshot()
    waiting = _our_waiting_tasks(site, host, snapshot)
    if not waiting:
        return []  # nothing of ours waits in a paused group: no call to the host
    daemon = site.queue(host).daemon_start()
    seen = group_records(site.settings.state_dir, host)
    found = []
    for group, count in sorted(waiting.items()):
        tasks = [t for t in snapshot.tasks.values() if t.group == group]
        record = seen.get(group)
        verdict = pause_cause(snapshot.groups[group], tasks, daemon, record and record.seen)
        found.append(_act(site, host, group, count, verdict, daemon))
    return found


def _act(site: Site, host: str, group: str, count: int, verdict: Verdict, daemon: DaemonStart | None) -> PausedGroup:
    if verdict.by_restart:
        site.queue(host).start_group(group)
        site.status(host).invalidate()
        log.info("host %s: group %s started again after the pueue daemon restart at %s", host, group,
                 daemon and daemon.started_at)
        return PausedGroup(host, group, verdict, count, announce=False)
    first = note_pause_cause(site.settings.state_dir, host, group, f"paused on the host, {verdict.why}", utc_now())
    if first:
        log.warning("host %s: group %s is paused and holds %d waiting case(s); not paused by a pueue daemon "
                    "restart (%s): left for a person", host, group, count, verdict.why)
    return PausedGroup(host, group, verdict, count, announce=first)


def _our_waiting_tasks(site: Site, host: str, snapshot: QueueSnapshot) -> dict[str, int]:
    """Our live attempts' tasks queued in a paused group of the host, counted by group."""
    counts: dict[str, int] = {}
    for case in site.ledger.cases_in_states(ACTIVE_STATES):
        attempt = site.ledger.live_attempt(case.id)
        if attempt is None or attempt.host != host or attempt.task_id is None:
            continue
        task = snapshot.find(attempt.task_id, attempt.label)
        group = snapshot.groups.get(task.group) if task is not None else None
        if task is not None and task.state is TaskState.QUEUED and group is not None and group.paused:
            counts[task.group] = counts.get(task.group, 0) + 1
    return counts
