"""Reading the JSON that pueue prints, for both major versions (v3 and v4).

v3 and v4 differ in how a task's status is written: v3 uses bare variant names
(`"Running"`) with start/end as top-level task fields, v4 wraps every variant in an object
that carries its own times. Both are read into the same `TaskInfo`. Unknown extra fields are
ignored so that newer minor versions keep working; a missing field we rely on or an unknown
variant is an error that names where it was found.

Error messages never quote the raw output: `status --json` carries the stored environment of
every task on the host, including tasks that are not ours.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from mqi.queue.base import GroupInfo, QueueError, QueueSnapshot, TaskInfo, TaskResult, TaskState


class PueueOutputError(QueueError):
    """pueue printed something we cannot read (truncated, not JSON, or an unknown shape)."""

    def __init__(self, host: str, source: str, problem: str):
        self.host = host
        self.source = source
        self.problem = problem
        super().__init__(f"host {host!r}: cannot read the output of `pueue {source}`: {problem}")


class _BadShape(Exception):
    """Raised deep inside the parser; turned into PueueOutputError with the host at the top."""

    def __init__(self, where: str, problem: str):
        super().__init__(f"{where}: {problem}" if where else problem)


@dataclass(frozen=True)
class TaskLog:
    task: TaskInfo
    output: str


def parse_status(text: str, host: str) -> QueueSnapshot:
    """Read `pueue status --json` (or a state file: the same tasks and groups)."""
    source = "status --json"
    document = _load(text, host, source)
    try:
        top = _object(document, "")
        tasks = {
            task.id: task
            for task in (
                _task_under_key(key, raw, f"tasks[{key!r}]")
                for key, raw in _object(_field(top, "tasks", ""), "tasks").items()
            )
        }
        groups = _groups(_field(top, "groups", ""), "groups")
    except _BadShape as problem:
        raise PueueOutputError(host, source, str(problem)) from None
    return QueueSnapshot(tasks=tasks, groups=groups)


def parse_groups(text: str, host: str) -> dict[str, GroupInfo]:
    """Read `pueue group --json`."""
    source = "group --json"
    document = _load(text, host, source)
    try:
        return _groups(document, "")
    except _BadShape as problem:
        raise PueueOutputError(host, source, str(problem)) from None


def parse_log(text: str, host: str) -> dict[int, TaskLog]:
    """Read `pueue log --json`: the task and its output text, by task id."""
    source = "log --json"
    document = _load(text, host, source)
    try:
        logs = {}
        for key, raw in _object(document, "").items():
            entry = _object(raw, f"[{key!r}]")
            task = _task_under_key(key, _field(entry, "task", f"[{key!r}]"), f"[{key!r}].task")
            output = _optional(entry, "output", str, f"[{key!r}]") or ""
            logs[task.id] = TaskLog(task=task, output=output)
        return logs
    except _BadShape as problem:
        raise PueueOutputError(host, source, str(problem)) from None


_RFC3339 = re.compile(
    r"(?P<date>\d{4}-\d{2}-\d{2})[Tt ](?P<time>\d{2}:\d{2}:\d{2})(?:\.(?P<fraction>\d+))?"
    r"(?P<offset>[Zz]|[+-]\d{2}:\d{2})"
)


def parse_timestamp(value: str) -> datetime:
    """An RFC 3339 time with 0 to 9 fractional digits and any offset, as an aware UTC datetime.

    Fractional digits beyond microseconds are cut off (not rounded: rounding could carry
    into the next second). Raises ValueError for anything else, including a missing offset.
    """
    match = _RFC3339.fullmatch(value)
    if match is None:
        raise ValueError(f"not an RFC 3339 time with offset: {value!r}")
    micro = (match["fraction"] or "")[:6].ljust(6, "0")
    offset = match["offset"]
    if offset in ("Z", "z"):
        offset = "+00:00"
    local = datetime.fromisoformat(f"{match['date']}T{match['time']}.{micro}{offset}")
    return local.astimezone(timezone.utc)


def _load(text: str, host: str, source: str) -> Any:
    if not text.strip():
        raise PueueOutputError(host, source, "no output at all")
    text = _without_leading_warnings(text)
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise PueueOutputError(
            host,
            source,
            f"not valid JSON ({error.msg} at character {error.pos} of {len(text)}; "
            "truncated output?)",
        ) from None


def _without_leading_warnings(text: str) -> str:
    """Some clients print a version warning line on stdout before the JSON: skip such lines."""
    lines = text.splitlines(keepends=True)
    for number, line in enumerate(lines):
        if line.lstrip().startswith(("{", "[")):
            return "".join(lines[number:])
    return text


# --- shape helpers: each takes `where` (a path such as tasks['3'].status) for messages ---


def _object(value: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise _BadShape(where, f"expected an object, found {_kind(value)}")
    return value


def _field(obj: Mapping[str, Any], name: str, where: str) -> Any:
    if name not in obj:
        raise _BadShape(where, f"missing field {name!r}")
    return obj[name]


def _optional(obj: Mapping[str, Any], name: str, kind: type, where: str) -> Any:
    value = obj.get(name)
    if value is not None and not _is(value, kind):
        raise _BadShape(_join(where, name), f"expected {kind.__name__}, found {_kind(value)}")
    return value


def _required(obj: Mapping[str, Any], name: str, kind: type, where: str) -> Any:
    value = _field(obj, name, where)
    if not _is(value, kind):
        raise _BadShape(_join(where, name), f"expected {kind.__name__}, found {_kind(value)}")
    return value


def _time(obj: Mapping[str, Any], name: str, where: str) -> datetime | None:
    value = _optional(obj, name, str, where)
    if value is None:
        return None
    try:
        return parse_timestamp(value)
    except ValueError as error:
        raise _BadShape(_join(where, name), str(error)) from None


def _is(value: Any, kind: type) -> bool:
    # bool is an int in Python; JSON true is never a count or an id
    return isinstance(value, kind) and not (kind is int and isinstance(value, bool))


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _join(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name


# --- tasks and their status ---


@dataclass(frozen=True)
class _Status:
    state: TaskState
    result: TaskResult | None = None
    exit_code: int | None = None
    spawn_error: str | None = None
    enqueued_at: datetime | None = None
    start: datetime | None = None
    end: datetime | None = None


_PLAIN_STATES = {
    "Queued": TaskState.QUEUED,
    "Running": TaskState.RUNNING,
    "Paused": TaskState.PAUSED,
    "Locked": TaskState.LOCKED,
    "Stashed": TaskState.STASHED,
}

_PLAIN_RESULTS = {
    "Success": TaskResult.SUCCESS,
    "Killed": TaskResult.KILLED,
    "Errored": TaskResult.ERRORED,
    "DependencyFailed": TaskResult.DEPENDENCY_FAILED,
}


def _task_under_key(key: str, raw: Any, where: str) -> TaskInfo:
    task = _task(raw, where)
    if key != str(task.id):
        raise _BadShape(where, f"listed under key {key!r} but has id {task.id}")
    return task


def _task(raw: Any, where: str) -> TaskInfo:
    obj = _object(raw, where)
    status = _status(_field(obj, "status", where), _join(where, "status"))
    # v3 keeps the times beside the status, v4 inside it
    return TaskInfo(
        id=_required(obj, "id", int, where),
        label=_optional(obj, "label", str, where),
        group=_required(obj, "group", str, where),
        state=status.state,
        result=status.result,
        exit_code=status.exit_code,
        spawn_error=status.spawn_error,
        command=_optional(obj, "command", str, where) or "",
        path=_optional(obj, "path", str, where) or "",
        created_at=_time(obj, "created_at", where),
        enqueued_at=status.enqueued_at or _time(obj, "enqueued_at", where),
        start=status.start or _time(obj, "start", where),
        end=status.end or _time(obj, "end", where),
    )


def _status(raw: Any, where: str) -> _Status:
    if isinstance(raw, str):  # v3 unit variants
        if raw not in _PLAIN_STATES:
            raise _BadShape(where, f"unknown task status {raw!r}")
        return _Status(_PLAIN_STATES[raw])
    variant, body = _variant(raw, where)
    inner = _join(where, variant)
    if variant == "Done":
        return _done(body, inner)
    if variant == "Locked":
        return _locked(body, inner)
    if variant not in _PLAIN_STATES:
        raise _BadShape(where, f"unknown task status {variant!r}")
    fields = _object(body, inner)
    return _Status(
        _PLAIN_STATES[variant],
        enqueued_at=_time(fields, "enqueued_at", inner),
        start=_time(fields, "start", inner),
    )


def _locked(body: Any, where: str) -> _Status:
    # v4 keeps what the task was before it was locked; its times are still the task's times
    if body is None:
        return _Status(TaskState.LOCKED)
    previous_raw = _object(body, where).get("previous_status")
    if previous_raw is None:
        return _Status(TaskState.LOCKED)
    previous = _status(previous_raw, _join(where, "previous_status"))
    return _Status(TaskState.LOCKED, enqueued_at=previous.enqueued_at, start=previous.start)


def _done(body: Any, where: str) -> _Status:
    if isinstance(body, dict) and "result" in body:  # v4: times and result together
        return _with_result(
            body["result"],
            _join(where, "result"),
            enqueued_at=_time(body, "enqueued_at", where),
            start=_time(body, "start", where),
            end=_time(body, "end", where),
        )
    return _with_result(body, where)  # v3: the result itself


def _with_result(raw: Any, where: str, **times: datetime | None) -> _Status:
    if isinstance(raw, str):
        if raw not in _PLAIN_RESULTS:
            raise _BadShape(where, f"unknown task result {raw!r}")
        result = _PLAIN_RESULTS[raw]
        exit_code = 0 if result is TaskResult.SUCCESS else None
        return _Status(TaskState.DONE, result, exit_code, **times)
    variant, body = _variant(raw, where)
    if variant == "Failed":
        if not _is(body, int):
            raise _BadShape(_join(where, variant), f"expected an exit code, found {_kind(body)}")
        return _Status(TaskState.DONE, TaskResult.FAILED, exit_code=body, **times)
    if variant == "FailedToSpawn":
        if not isinstance(body, str):
            raise _BadShape(_join(where, variant), f"expected a message, found {_kind(body)}")
        return _Status(TaskState.DONE, TaskResult.FAILED_TO_SPAWN, spawn_error=body, **times)
    raise _BadShape(where, f"unknown task result {variant!r}")


def _variant(raw: Any, where: str) -> tuple[str, Any]:
    """serde's external tagging: an object with exactly one key, the variant name."""
    obj = _object(raw, where)
    if len(obj) != 1:
        raise _BadShape(where, f"expected one variant name, found keys {sorted(obj)}")
    ((variant, body),) = obj.items()
    return variant, body


# --- groups ---

_GROUP_STATUSES = {"Running": False, "Paused": True, "Reset": False}


def _groups(raw: Any, where: str) -> dict[str, GroupInfo]:
    groups = {}
    for name, body in _object(raw, where).items():
        inner = f"{where}[{name!r}]" if where else f"[{name!r}]"
        fields = _object(body, inner)
        status = _required(fields, "status", str, inner)
        if status not in _GROUP_STATUSES:
            raise _BadShape(_join(inner, "status"), f"unknown group status {status!r}")
        parallel = _required(fields, "parallel_tasks", int, inner)
        groups[name] = GroupInfo(name=name, paused=_GROUP_STATUSES[status], parallel=parallel)
    return groups
