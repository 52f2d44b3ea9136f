"""The pueue JSON parser against hand-written v3 and v4 output and pueue's own v4 state file."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from mqi.queue.base import TaskResult, TaskState
from mqi.queue.pueue_json import (
    PueueOutputError,
    parse_groups,
    parse_log,
    parse_status,
    parse_timestamp,
)

SHARED_PUEUE = Path(__file__).resolve().parents[1].parent / "shared" / "pueue"

T0 = "2024-07-18T14:55:02.656354132+02:00"
T1 = "2024-07-18T14:55:03.5+02:00"
T2 = "2024-07-18T14:55:09+02:00"
UTC = timezone.utc
QUEUED_V4 = {"Queued": {"enqueued_at": T0}}


def utc(text: str) -> datetime:
    return datetime.fromisoformat(text).astimezone(UTC)


def v3_task(task_id: int, status, *, label="mqi-c1-a1", start=None, end=None, **extra) -> dict:
    task = {
        "id": task_id,
        "created_at": T0,
        "enqueued_at": T0,
        "original_command": "python run.py",
        "command": "python run.py",
        "path": "/data/cases/c1",
        "envs": {"PATH": "/usr/bin"},
        "group": "gpu0",
        "dependencies": [],
        "priority": 0,
        "label": label,
        "status": status,
        "prev_status": "Queued",
        "start": start,
        "end": end,
    }
    return task | extra


def v4_task(task_id: int, status, *, label="mqi-c1-a1", **extra) -> dict:
    task = {
        "id": task_id,
        "created_at": T0,
        "original_command": "python run.py",
        "command": "python run.py",
        "path": "/data/cases/c1",
        "envs": {},
        "group": "gpu0",
        "dependencies": [],
        "priority": 0,
        "label": label,
        "status": status,
    }
    return task | extra


def status_json(*tasks: dict, groups: dict | None = None) -> str:
    groups = groups if groups is not None else {"gpu0": {"status": "Running", "parallel_tasks": 1}}
    return json.dumps({"tasks": {str(t["id"]): t for t in tasks}, "groups": groups})


def only_task(text: str):
    (task,) = parse_status(text, "gpu-a").tasks.values()
    return task


# --- v3 ---


@pytest.mark.parametrize(
    ("status", "state"),
    [
        ("Queued", TaskState.QUEUED),
        ("Running", TaskState.RUNNING),
        ("Paused", TaskState.PAUSED),
        ("Locked", TaskState.LOCKED),
        ({"Stashed": {"enqueue_at": None}}, TaskState.STASHED),
        ({"Stashed": {"enqueue_at": T2}}, TaskState.STASHED),
    ],
)
def test_v3_unfinished_states(status, state):
    start = T1 if state is TaskState.RUNNING else None
    task = only_task(status_json(v3_task(4, status, start=start)))
    assert task.state is state
    assert task.result is None and task.exit_code is None
    assert not task.finished


@pytest.mark.parametrize(
    ("done", "result", "exit_code"),
    [
        ("Success", TaskResult.SUCCESS, 0),
        ({"Failed": 3}, TaskResult.FAILED, 3),
        ({"Failed": 127}, TaskResult.FAILED, 127),
        ("Killed", TaskResult.KILLED, None),
        ("Errored", TaskResult.ERRORED, None),
        ("DependencyFailed", TaskResult.DEPENDENCY_FAILED, None),
    ],
)
def test_v3_results(done, result, exit_code):
    task = only_task(status_json(v3_task(7, {"Done": done}, start=T1, end=T2)))
    assert task.state is TaskState.DONE and task.finished
    assert task.result is result
    assert task.exit_code == exit_code
    assert task.start == utc(T1) and task.end == utc(T2)


def test_v3_failed_to_spawn_keeps_the_message():
    done = {"Done": {"FailedToSpawn": "No such file or directory (os error 2)"}}
    task = only_task(status_json(v3_task(1, done, start=T1, end=T1)))
    assert task.result is TaskResult.FAILED_TO_SPAWN
    assert task.spawn_error == "No such file or directory (os error 2)"
    assert task.exit_code is None


def test_v3_task_fields():
    task = only_task(status_json(v3_task(12, "Running", start=T1)))
    assert (task.id, task.label, task.group) == (12, "mqi-c1-a1", "gpu0")
    assert task.command == "python run.py"
    assert task.path == "/data/cases/c1"
    assert task.created_at == utc("2024-07-18T14:55:02.656354+02:00")
    assert task.enqueued_at == task.created_at
    assert task.start == utc(T1)
    assert task.end is None


# --- v4 ---


@pytest.mark.parametrize(
    ("status", "state", "start"),
    [
        (QUEUED_V4, TaskState.QUEUED, None),
        ({"Running": {"enqueued_at": T0, "start": T1}}, TaskState.RUNNING, T1),
        ({"Paused": {"enqueued_at": T0, "start": T1}}, TaskState.PAUSED, T1),
        ({"Stashed": {"enqueue_at": None}}, TaskState.STASHED, None),
        ({"Stashed": {"enqueue_at": T2}}, TaskState.STASHED, None),
    ],
)
def test_v4_unfinished_states(status, state, start):
    task = only_task(status_json(v4_task(3, status)))
    assert task.state is state
    assert task.start == (utc(start) if start else None)
    assert task.end is None and task.result is None


def test_v4_locked_keeps_the_times_of_its_previous_status():
    previous = {"Running": {"enqueued_at": T0, "start": T1}}
    task = only_task(status_json(v4_task(3, {"Locked": {"previous_status": previous}})))
    assert task.state is TaskState.LOCKED
    assert task.start == utc(T1)
    assert task.enqueued_at == utc(T0)


def test_v4_locked_inside_locked_and_bare_locked():
    nested = {"Locked": {"previous_status": {"Locked": {"previous_status": QUEUED_V4}}}}
    assert only_task(status_json(v4_task(3, nested))).enqueued_at == utc(T0)
    assert only_task(status_json(v4_task(3, {"Locked": {}}))).state is TaskState.LOCKED


@pytest.mark.parametrize(
    ("result", "expected", "exit_code", "spawn_error"),
    [
        ("Success", TaskResult.SUCCESS, 0, None),
        ({"Failed": 2}, TaskResult.FAILED, 2, None),
        ("Killed", TaskResult.KILLED, None, None),
        ("Errored", TaskResult.ERRORED, None, None),
        ("DependencyFailed", TaskResult.DEPENDENCY_FAILED, None, None),
        ({"FailedToSpawn": "working directory missing"}, TaskResult.FAILED_TO_SPAWN, None,
         "working directory missing"),
    ],
)
def test_v4_results(result, expected, exit_code, spawn_error):
    done = {"Done": {"enqueued_at": T0, "start": T1, "end": T2, "result": result}}
    task = only_task(status_json(v4_task(9, done)))
    assert task.state is TaskState.DONE
    assert (task.result, task.exit_code, task.spawn_error) == (expected, exit_code, spawn_error)
    assert (task.enqueued_at, task.start, task.end) == (utc(T0), utc(T1), utc(T2))


def test_v4_tolerates_unknown_extra_fields():
    running = {"Running": {"enqueued_at": T0, "start": T1, "cpu": 3}}
    task = v4_task(1, running, future_field={"x": 1})
    text = json.dumps(
        {
            "tasks": {"1": task},
            "groups": {"gpu0": {"status": "Running", "parallel_tasks": 2, "color": "red"}},
            "settings": {},
        }
    )
    snapshot = parse_status(text, "gpu-a")
    assert snapshot.tasks[1].state is TaskState.RUNNING
    assert snapshot.groups["gpu0"].parallel == 2


def test_version_warning_line_before_the_json_is_skipped():
    warning = "Different daemon version detected '3.4.0'. Consider restarting the daemon.\n"
    text = warning + status_json(v3_task(2, "Running", start=T1))
    assert parse_status(text, "gpu-a").tasks[2].state is TaskState.RUNNING


def test_null_label_and_empty_queue():
    assert only_task(status_json(v4_task(0, QUEUED_V4, label=None))).label is None
    empty = parse_status('{"tasks": {}, "groups": {}}', "gpu-a")
    assert empty.tasks == {} and empty.groups == {}


def test_real_v4_state_file_from_pueue():
    snapshot = parse_status((SHARED_PUEUE / "v4.0.0_state.json").read_text(), "state-file")
    states = {task_id: (t.state, t.result, t.exit_code) for task_id, t in snapshot.tasks.items()}
    assert states == {
        0: (TaskState.DONE, TaskResult.SUCCESS, 0),
        1: (TaskState.DONE, TaskResult.FAILED, 2),
        2: (TaskState.STASHED, None, None),
        3: (TaskState.RUNNING, None, None),
        4: (TaskState.QUEUED, None, None),
        5: (TaskState.QUEUED, None, None),
    }
    running = snapshot.tasks[3]
    assert running.start == datetime(2024, 7, 18, 12, 55, 23, 365190, tzinfo=UTC)
    assert running.command == "sleep 9000000"
    assert set(snapshot.groups) == {"default", "test"}
    assert not snapshot.groups["test"].paused and snapshot.groups["test"].parallel == 1


# --- groups ---


def test_group_statuses():
    groups = parse_groups(
        json.dumps(
            {
                "default": {"status": "Running", "parallel_tasks": 1},
                "gpu0": {"status": "Paused", "parallel_tasks": 2},
                "gpu1": {"status": "Reset", "parallel_tasks": 0},
            }
        ),
        "gpu-a",
    )
    assert [(g.name, g.paused, g.parallel) for g in groups.values()] == [
        ("default", False, 1),
        ("gpu0", True, 2),
        ("gpu1", False, 0),
    ]


def test_unknown_group_status_is_an_error():
    expected = r"\['gpu0'\]\.status: unknown group status 'Frozen'"
    with pytest.raises(PueueOutputError, match=expected):
        parse_groups('{"gpu0": {"status": "Frozen", "parallel_tasks": 1}}', "gpu-a")


# --- timestamps ---


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2024-07-18T14:55:02Z", datetime(2024, 7, 18, 14, 55, 2, tzinfo=UTC)),
        ("2024-07-18T14:55:02z", datetime(2024, 7, 18, 14, 55, 2, tzinfo=UTC)),
        ("2024-07-18T14:55:02.5Z", datetime(2024, 7, 18, 14, 55, 2, 500000, tzinfo=UTC)),
        ("2024-07-18T14:55:02.123+00:00", datetime(2024, 7, 18, 14, 55, 2, 123000, tzinfo=UTC)),
        ("2024-07-18T14:55:02.123456+02:00", datetime(2024, 7, 18, 12, 55, 2, 123456, tzinfo=UTC)),
        ("2024-07-18T14:55:02.1234567+02:00", datetime(2024, 7, 18, 12, 55, 2, 123456, tzinfo=UTC)),
        # nine digits are cut, not rounded: .999999999 must not carry into the next second
        ("2024-07-18T23:59:59.999999999Z", datetime(2024, 7, 18, 23, 59, 59, 999999, tzinfo=UTC)),
        ("2024-07-18T14:55:02.000000001-05:30", datetime(2024, 7, 18, 20, 25, 2, tzinfo=UTC)),
        ("2024-07-18 14:55:02+05:45", datetime(2024, 7, 18, 9, 10, 2, tzinfo=UTC)),
    ],
)
def test_timestamps(text, expected):
    parsed = parse_timestamp(text)
    assert parsed == expected
    assert parsed.utcoffset() == timedelta(0)


@pytest.mark.parametrize(
    "text",
    [
        "2024-07-18T14:55:02",
        "2024-07-18",
        "yesterday",
        "2024-13-18T14:55:02Z",
        "2024-07-18T14:55:02.Z",
    ],
)
def test_bad_timestamps_are_refused(text):
    with pytest.raises(ValueError):
        parse_timestamp(text)


def test_bad_timestamp_in_a_task_names_the_field():
    task = v4_task(5, {"Running": {"enqueued_at": T0, "start": "2024-07-18T14:55:02"}})
    expected = r"tasks\['5'\]\.status\.Running\.start: not an RFC 3339"
    with pytest.raises(PueueOutputError, match=expected):
        parse_status(status_json(task), "gpu-a")


# --- malformed output ---


def test_truncated_output_names_the_host_and_the_problem():
    text = status_json(v4_task(1, QUEUED_V4))
    with pytest.raises(PueueOutputError) as caught:
        parse_status(text[: len(text) // 2], "gpu-a")
    message = str(caught.value)
    assert "host 'gpu-a'" in message and "status --json" in message
    assert "not valid JSON" in message and "truncated" in message


def test_error_messages_never_quote_task_environments():
    task = v4_task(1, QUEUED_V4, envs={"DB_PASSWORD": "hunter2"})
    text = status_json(task)
    for broken in (text[:-3], text.replace('"Queued"', '"Frozen"')):
        with pytest.raises(PueueOutputError) as caught:
            parse_status(broken, "gpu-a")
        assert "hunter2" not in str(caught.value)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("", "no output at all"),
        ("New task added (id 5).", "not valid JSON"),
        ("[]", "expected an object, found list"),
        ('{"groups": {}}', "missing field 'tasks'"),
        ('{"tasks": {}}', "missing field 'groups'"),
        ('{"tasks": [], "groups": {}}', "tasks: expected an object, found list"),
        (status_json(v4_task(1, "Sleeping")), r"tasks\['1'\]\.status: unknown task status"),
        (status_json(v4_task(1, {"Done": "Exploded"})), "unknown task result 'Exploded'"),
        (status_json(v4_task(1, {"Done": {"result": {"Failed": "x"}}})), "expected an exit code"),
        (status_json(v4_task(1, {"Done": {"result": {"Failed": True}}})), "expected an exit code"),
        (status_json(v4_task(1, {"Queued": {}, "Running": {}})), "expected one variant name"),
        (status_json(v4_task(1, QUEUED_V4, id="1")), r"\.id: expected int"),
        (status_json(v3_task(1, "Queued", group=None)), "group: expected str, found null"),
        (
            json.dumps({"tasks": {"2": v3_task(1, "Queued")}, "groups": {}}),
            r"listed under key '2' but has id 1",
        ),
        (
            status_json(groups={"gpu0": {"status": "Running"}}),
            r"groups\['gpu0'\]: missing field 'parallel_tasks'",
        ),
    ],
)
def test_malformed_status_is_a_clear_error(text, problem):
    with pytest.raises(PueueOutputError, match=problem) as caught:
        parse_status(text, "gpu-a")
    prefix = "host 'gpu-a': cannot read the output of `pueue status --json`"
    assert str(caught.value).startswith(prefix)


# --- log ---


def test_log_output_by_task_id_for_both_formats():
    v4 = v4_task(3, {"Done": {"enqueued_at": T0, "start": T1, "end": T2, "result": "Success"}})
    v3 = v3_task(4, {"Done": {"Failed": 1}}, label="mqi-c2-a1", start=T1, end=T2)
    text = json.dumps(
        {"3": {"task": v4, "output": "step 1\nstep 2\n"}, "4": {"task": v3, "output": "oops\n"}}
    )
    logs = parse_log(text, "gpu-a")
    assert logs[3].output == "step 1\nstep 2\n" and logs[3].task.label == "mqi-c1-a1"
    assert logs[4].task.exit_code == 1 and logs[4].output == "oops\n"


def test_log_of_unknown_id_is_empty_and_missing_output_is_empty_text():
    assert parse_log("{}", "gpu-a") == {}
    not_started = {"3": {"task": v4_task(3, QUEUED_V4), "output": None}}
    logs = parse_log(json.dumps(not_started), "gpu-a")
    assert logs[3].output == ""


def test_malformed_log_is_a_clear_error():
    expected = r"`pueue log --json`: \['3'\]: missing field 'task'"
    with pytest.raises(PueueOutputError, match=expected):
        parse_log('{"3": {"output": "x"}}', "gpu-a")
