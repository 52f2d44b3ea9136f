"""The rule that tells a pueue daemon restart from a person's hand, from evidence alone.

pueue records no reason for a killed task or a paused group. A restart of its daemon leaves
two marks (pueue's `restore_state`, v3.4 and v4.0): every task that was running or paused
becomes Done/Killed, and every group that still holds a queued task is paused. A graceful
stop first (SIGTERM at a reboot, `pueue shutdown`) kills the running tasks itself and records
them Killed with the time of the stop. An operator leaves the same marks by hand:
`pueue kill ID`, `pueue pause --group G`. What tells them apart:

(a) A task that ended Killed was killed by the restart when
    - it has no end time: pueue v3 marks a task Killed at restore without one, and nothing
      else gives a Killed task no end; or
    - it started before the daemon did and ended at or after that start (v4 restores it with
      the restore time as its end); or
    - it ended before the daemon started, at most SHUTDOWN_WINDOW earlier, and no task on the
      host started between its end and the daemon's start: a daemon that stops kills its
      tasks and starts none, while one that goes on (after a `pueue kill`) starts the next
      queued task within a second.
    Otherwise (a task started under the running daemon, or no daemon start known) someone
    else killed it: an operator's `pueue kill`, or a signal from outside pueue.

(b) A paused group was paused by the restart when
    - a task waited in it (queued, enqueued before the daemon started): pueue pauses only
      such groups; and
    - we saw it running before the daemon started; and
    - we did not see it paused already before the daemon started.
    Otherwise an operator paused it (or we cannot tell): it is left paused for a person.

Task times and the daemon's start come from the host's clock (aware: pueue prints them in the
host's local offset); what we saw of a group is on our clock, so it is compared with the
daemon's start as placed on our clock (`DaemonStart.started_at_here`). That placing is known
only to half the time the call took, plus CLOCK_SLACK; what we saw is taken as evidence of a
person only when it is clear of that margin (seen running at the start of a status call: the
host read its state after that; seen paused at its end: the host read it before that).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta

from mqi.queue.base import DaemonStart, GroupInfo, TaskInfo, TaskResult, TaskState

#: how long before the daemon's start a graceful stop may have killed a task (a reboot of a
#: GPU server, its firmware checks included, fits well inside)
SHUTDOWN_WINDOW = timedelta(minutes=15)
#: allowance for the precision of the daemon's start (10 ms), of the times pueue prints and of
#: our clock against the host's
CLOCK_SLACK = timedelta(seconds=1)


class Cause(enum.StrEnum):
    RESTART = "restart"  # the pueue daemon restarted
    OPERATOR = "operator"  # a person or another program on the host, or cannot be told


@dataclass(frozen=True)
class Verdict:
    cause: Cause
    why: str  # the evidence, in words, for the ledger, the log and `mqi hosts`

    @property
    def by_restart(self) -> bool:
        return self.cause is Cause.RESTART


@dataclass(frozen=True)
class GroupSeen:
    """What we last saw of a group, on our clock."""

    running_at: datetime | None = None  # the last time it was seen running (a status call's start)
    paused_since: datetime | None = None  # the first time it was seen paused after that (a call's end)


def kill_cause(task: TaskInfo, daemon_started_at: datetime | None, host_tasks: Iterable[TaskInfo]) -> Verdict:
    """Rule (a): was this Killed task killed by a daemon restart? `daemon_started_at` on the
    host's clock (None: not known); `host_tasks`: every task the host lists now."""
    if task.result is not TaskResult.KILLED:
        raise ValueError(f"task {task.id} ended {task.result}, not killed")
    if task.end is None:
        return Verdict(Cause.RESTART, "pueue marked it Killed without an end time, as it does when its daemon starts")
    if daemon_started_at is None:
        return Verdict(Cause.OPERATOR, "no start of the pueue daemon could be read, so no restart is known")
    start = _text(daemon_started_at)
    if task.start is not None and task.start >= daemon_started_at:
        return Verdict(Cause.OPERATOR, f"it started at {_text(task.start)}, under the daemon running since {start}")
    if task.end >= daemon_started_at - CLOCK_SLACK:
        return Verdict(Cause.RESTART, f"it was running when the pueue daemon started again at {start}")
    before = daemon_started_at - task.end
    if before > SHUTDOWN_WINDOW:
        return Verdict(Cause.OPERATOR, f"it was killed at {_text(task.end)}, {_span(before)} before the daemon "
                                       f"started at {start}")
    started_between = [t for t in host_tasks if t.start is not None and task.end < t.start < daemon_started_at]
    if started_between:
        return Verdict(Cause.OPERATOR, f"the daemon went on after it was killed at {_text(task.end)} "
                                       f"(task {started_between[0].id} started later)")
    return Verdict(Cause.RESTART, f"it was killed as the pueue daemon stopped, {_span(before)} before it started "
                                  f"again at {start}")


def pause_cause(group: GroupInfo, group_tasks: Iterable[TaskInfo], daemon: DaemonStart | None,
                seen: GroupSeen | None) -> Verdict:
    """Rule (b): was this paused group paused by a daemon restart? `group_tasks`: the tasks
    the host lists in the group now; `seen`: what we last saw of it (None: never seen)."""
    if not group.paused:
        raise ValueError(f"group {group.name} is not paused")
    if daemon is None:
        return Verdict(Cause.OPERATOR, "no start of the pueue daemon could be read, so no restart is known")
    start_there, start_here = daemon.started_at, daemon.started_at_here
    margin = daemon.uncertainty + CLOCK_SLACK
    waited = any(t.state is TaskState.QUEUED and _queued_at(t) is not None and _queued_at(t) < start_there
                 for t in group_tasks)
    if not waited:
        return Verdict(Cause.OPERATOR, f"no task waited in it when the pueue daemon started at {_text(start_there)}, "
                                       "and pueue pauses only groups with waiting tasks")
    if seen is None or seen.running_at is None:
        return Verdict(Cause.OPERATOR, "it was never seen running, so it may have been paused before the restart")
    if seen.running_at > start_here + margin:
        return Verdict(Cause.OPERATOR, f"it was seen running at {_text(seen.running_at)}, after the pueue daemon "
                                       f"started at {_text(start_here)}: paused since by someone")
    if seen.paused_since is not None and seen.paused_since < start_here - margin:
        return Verdict(Cause.OPERATOR, f"it was already paused at {_text(seen.paused_since)}, before the pueue "
                                       f"daemon started at {_text(start_here)}")
    return Verdict(Cause.RESTART, f"seen running at {_text(seen.running_at)}; the pueue daemon started again at "
                                  f"{_text(start_here)} with tasks waiting in it, and paused it")


def _queued_at(task: TaskInfo) -> datetime | None:
    return task.enqueued_at or task.created_at


def _text(moment: datetime) -> str:
    """A time for the ledger and the log: UTC (as every time here is read), to the second."""
    return moment.isoformat(timespec="seconds")


def _span(delta: timedelta) -> str:
    seconds = delta.total_seconds()
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"
