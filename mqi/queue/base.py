"""The queue interface shared by the pueue client and the local queue.

A task is always identified by its id AND its label: pueue reuses ids after `pueue clean`,
so an id alone may name somebody else's task.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from mqi.errors import MqiError


class QueueError(MqiError):
    """The queue refused or failed an operation (unknown group, daemon down, bad output)."""


class TaskState(enum.StrEnum):
    QUEUED = "queued"
    STASHED = "stashed"
    LOCKED = "locked"
    RUNNING = "running"
    PAUSED = "paused"
    DONE = "done"


class TaskResult(enum.StrEnum):
    SUCCESS = "success"
    FAILED = "failed"  # exit code in TaskInfo.exit_code
    KILLED = "killed"
    ERRORED = "errored"
    DEPENDENCY_FAILED = "dependency_failed"
    FAILED_TO_SPAWN = "failed_to_spawn"


@dataclass(frozen=True)
class TaskInfo:
    id: int
    label: str | None
    group: str
    state: TaskState
    result: TaskResult | None = None  # set when state is DONE
    exit_code: int | None = None  # 0 for success, n for Failed(n)
    spawn_error: str | None = None  # message of FailedToSpawn
    command: str = ""
    path: str = ""
    created_at: datetime | None = None  # all times timezone-aware
    enqueued_at: datetime | None = None
    start: datetime | None = None
    end: datetime | None = None

    @property
    def finished(self) -> bool:
        return self.state is TaskState.DONE


@dataclass(frozen=True)
class GroupInfo:
    name: str
    paused: bool
    parallel: int


@dataclass(frozen=True)
class QueueSnapshot:
    """Everything one status call returned for one host."""

    tasks: Mapping[int, TaskInfo]
    groups: Mapping[str, GroupInfo]

    def find(self, task_id: int | None, label: str) -> TaskInfo | None:
        """The task with this id and label, or else the newest one with this label."""
        if task_id is not None:
            task = self.tasks.get(task_id)
            if task is not None and task.label == label:
                return task
        matches = [t for t in self.tasks.values() if t.label == label]
        return max(matches, key=lambda t: t.id) if matches else None


@dataclass(frozen=True)
class DaemonStart:
    """When the daemon whose restart ends running tasks (pueue's `pueued`) started.

    `started_at` and `host_now` are read from the host's clock, as pueue's task times are;
    `asked_at` and `answered_at` are our clock around the call that read them. Together they
    place the start on our clock, to compare it with what we saw of the host ourselves, give or
    take `uncertainty`.
    """

    started_at: datetime  # aware
    host_now: datetime
    asked_at: datetime
    answered_at: datetime

    @property
    def clock_offset(self) -> timedelta:
        """How far the host's clock runs ahead of ours (negative: behind), give or take
        `uncertainty`: the host read its clock at some moment of our call."""
        return self.host_now - (self.asked_at + (self.answered_at - self.asked_at) / 2)

    @property
    def uncertainty(self) -> timedelta:
        return (self.answered_at - self.asked_at) / 2

    @property
    def started_at_here(self) -> datetime:
        """The start on our clock."""
        return self.started_at - self.clock_offset


@dataclass(frozen=True)
class SubmitRequest:
    label: str  # identifies case and attempt, e.g. mqi-<uid>-a<n>
    group: str
    workdir: str  # the case folder on the host; the command runs there
    command: str  # shell command line run by `sh -c` inside workdir
    env: Mapping[str, str] = field(default_factory=dict)  # e.g. CUDA_VISIBLE_DEVICES, MQI_CASE_UID


@dataclass(frozen=True)
class KillOutcome:
    confirmed: bool  # the task is finished (killed or ended by itself) or gone
    task: TaskInfo | None  # what was seen last
    message: str = ""


class Queue(ABC):
    """A task queue on one host."""

    host: str

    @abstractmethod
    def submit(self, request: SubmitRequest, *, adopt: bool = True) -> int:
        """Add the task and return its id; with `adopt`, a task with the same label (a submission
        resumed after a crash) is returned instead. Without, no status is read first: for a
        label made just now, that no task can carry yet."""

    @abstractmethod
    def snapshot(self) -> QueueSnapshot:
        """One status call: every task and group on the host."""

    @abstractmethod
    def kill(self, task_id: int, label: str, *, confirm_timeout: float = 10.0) -> KillOutcome:
        """Kill this one task (never by group) and poll until it is finished or gone."""

    @abstractmethod
    def log_tails(self, tasks: Mapping[int, str], lines: int = 15) -> dict[int, str]:
        """The last `lines` lines of each task's output, by id (tasks given as id -> label), in
        one call; a task that is gone, has another label or no output yet maps to ''."""

    def daemon_start(self) -> DaemonStart | None:
        """When the queue's daemon started: the evidence of a restart. None when the queue has
        no daemon whose restart ends tasks, or it cannot be told. One call to the host: ask
        only when a task ended Killed or a group holding our tasks is paused, never per poll."""
        return None

    def start_group(self, group: str) -> None:
        """Resume a paused group (pueue: `pueue start --group G`)."""
        raise QueueError(f"host {self.host!r}: the {type(self).__name__} has no paused groups to start")

    def log_tail(self, task_id: int, label: str, lines: int = 15) -> str:
        """The last `lines` lines of one task's output ('' when it has none yet)."""
        return self.log_tails({task_id: label}, lines).get(task_id, "")

    def missing_or_paused_groups(self, wanted: list[str]) -> dict[str, str]:
        """Configured groups the host lacks or has paused: {group: 'missing'|'paused'}."""
        groups = self.snapshot().groups
        problems = {}
        for name in wanted:
            if name not in groups:
                problems[name] = "missing"
            elif groups[name].paused:
                problems[name] = "paused"
        return problems
