"""The local queue with real processes: slots, detachment, results, kills, logs, environment."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import replace
from datetime import UTC
from pathlib import Path

import pytest

from mqi.errors import ConfigError
from mqi.queue.base import QueueError, SubmitRequest, TaskResult, TaskState
from mqi.queue.local import LocalQueue, ProcessIdentity, live_group_members, write_json_atomic


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    folder = tmp_path / "case"
    folder.mkdir()
    return folder


@pytest.fixture
def make_queue(tmp_path: Path):
    """Queues on one root; at the end every task still running is killed."""
    root = tmp_path / "queue"
    made: list[LocalQueue] = []

    def make(groups: dict[str, int]) -> LocalQueue:
        made.append(LocalQueue(root, groups))
        return made[-1]

    yield make
    for queue in made:
        for task in queue.snapshot().tasks.values():
            if not task.finished:
                queue.kill(task.id, task.label, confirm_timeout=5)


def request(workdir: Path, command: str, *, label: str | None = None, group: str = "gpu", **env: str):
    return SubmitRequest(label=label or f"t-{uuid.uuid4().hex[:8]}", group=group, workdir=str(workdir),
                         command=command, env=env)


def wait_until_finished(queue: LocalQueue, task_ids: list[int], timeout: float = 15.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        tasks = queue.snapshot().tasks
        if all(tasks[i].finished for i in task_ids):
            return tasks
        time.sleep(0.05)
    raise AssertionError(f"tasks {task_ids} did not finish within {timeout}s")


def wait_for_log(queue: LocalQueue, task_id: int, label: str, text: str, timeout: float = 10.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        queue.snapshot()  # keeps the queue moving
        tail = queue.log_tail(task_id, label, lines=50)
        if text in tail:
            return tail
        time.sleep(0.05)
    raise AssertionError(f"{text!r} never appeared in the log of task {task_id}")


def process_has_ended(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    return state in ("Z", "X")


def live_process_groups_tagged(tag: str) -> set[int]:
    """Process groups of live processes whose environment holds MQI_TEST_TAG=tag."""
    groups = set()
    for entry in Path("/proc").iterdir():
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
            if f"MQI_TEST_TAG={tag}".encode() in environ and not process_has_ended(int(entry.name)):
                groups.add(os.getpgid(int(entry.name)))
        except (FileNotFoundError, ProcessLookupError, NotADirectoryError, PermissionError, ValueError):
            continue
    return groups


def test_exit_status_becomes_the_result(make_queue, workdir):
    queue = make_queue({"gpu": 4})
    ids = {
        "success": queue.submit(request(workdir, "exit 0")),
        "failed": queue.submit(request(workdir, "exit 7")),
        "typo": queue.submit(request(workdir, "no_such_command_mqi")),
        "signal": queue.submit(request(workdir, "kill -TERM $$")),
    }
    tasks = wait_until_finished(queue, list(ids.values()))

    assert (tasks[ids["success"]].result, tasks[ids["success"]].exit_code) == (TaskResult.SUCCESS, 0)
    assert (tasks[ids["failed"]].result, tasks[ids["failed"]].exit_code) == (TaskResult.FAILED, 7)
    assert (tasks[ids["typo"]].result, tasks[ids["typo"]].exit_code) == (TaskResult.FAILED, 127)
    assert tasks[ids["signal"]].result is TaskResult.KILLED
    for task in tasks.values():
        assert task.state is TaskState.DONE and task.path == str(workdir)
        assert task.created_at.tzinfo is UTC and task.created_at <= task.start <= task.end


def test_slots_per_group_are_never_exceeded(make_queue, workdir):
    queue = make_queue({"gpu": 2, "cpu": 1})
    tag = uuid.uuid4().hex
    slots = {"gpu": 2, "cpu": 1}
    ids = [queue.submit(request(workdir, "sleep 2", group="gpu", MQI_TEST_TAG=f"{tag}-gpu")) for _ in range(5)]
    ids += [queue.submit(request(workdir, "sleep 2", group="cpu", MQI_TEST_TAG=f"{tag}-cpu")) for _ in range(2)]

    most_running = {"gpu": 0, "cpu": 0}
    deadline = time.monotonic() + 60
    while True:
        tasks = queue.snapshot().tasks
        for group, limit in slots.items():
            running = [t for t in tasks.values() if t.group == group and t.state is TaskState.RUNNING]
            processes = live_process_groups_tagged(f"{tag}-{group}")
            assert len(running) <= limit and len(processes) <= limit, (group, running, processes)
            most_running[group] = max(most_running[group], len(running))
        if all(tasks[i].finished for i in ids) or time.monotonic() > deadline:
            break
        time.sleep(0.03)

    assert all(tasks[i].result is TaskResult.SUCCESS for i in ids)
    assert most_running == slots  # the slots were used, not just respected
    gpu_starts = [tasks[i].start for i in ids[:5]]
    assert gpu_starts == sorted(gpu_starts)  # queued tasks start in id order


def test_task_outlives_the_process_that_submitted_it(make_queue, workdir, tmp_path):
    root = tmp_path / "queue"
    submitter = subprocess.Popen(
        [sys.executable, "-c", (
            "import sys, time; from pathlib import Path\n"
            "from mqi.queue.local import LocalQueue\n"
            "from mqi.queue.base import SubmitRequest\n"
            f"queue = LocalQueue(Path({str(root)!r}), {{'gpu': 1}})\n"
            f"print(queue.submit(SubmitRequest('survivor', 'gpu', {str(workdir)!r}, "
            "'sleep 1; echo finished; exit 5')), flush=True)\n"
            "time.sleep(60)\n"
        )],
        stdout=subprocess.PIPE, text=True, start_new_session=True,
    )
    task_id = int(submitter.stdout.readline())
    os.killpg(submitter.pid, signal.SIGKILL)  # the orchestrator and its process group die
    submitter.wait()

    restarted = make_queue({"gpu": 1})
    assert restarted.snapshot().tasks[task_id].state is TaskState.RUNNING
    task = wait_until_finished(restarted, [task_id])[task_id]
    assert (task.label, task.result, task.exit_code) == ("survivor", TaskResult.FAILED, 5)
    assert restarted.log_tail(task_id, "survivor") == "finished"


def test_kill_ends_the_whole_process_group(make_queue, workdir):
    queue = make_queue({"gpu": 1})
    task_id = queue.submit(request(workdir, 'sleep 300 & echo "child $!"; sleep 300; wait', label="victim"))
    child = int(wait_for_log(queue, task_id, "victim", "child ").split()[1])
    assert not process_has_ended(child)

    outcome = queue.kill(task_id, "victim", confirm_timeout=5)

    assert outcome.confirmed and outcome.task.result is TaskResult.KILLED
    assert process_has_ended(child)
    assert queue.snapshot().tasks[task_id].result is TaskResult.KILLED


def test_killing_a_queued_task_removes_it_before_it_starts(make_queue, workdir):
    queue = make_queue({"gpu": 1})
    blocker = queue.submit(request(workdir, "sleep 300", label="blocker"))
    queued = queue.submit(request(workdir, "touch started", label="queued"))
    assert queue.snapshot().tasks[queued].state is TaskState.QUEUED

    outcome = queue.kill(queued, "queued")
    assert outcome.confirmed and outcome.task.result is TaskResult.KILLED and outcome.task.start is None
    assert queue.kill(blocker, "blocker").confirmed

    task = queue.snapshot().tasks[queued]
    assert (task.state, task.result, task.start) == (TaskState.DONE, TaskResult.KILLED, None)
    assert not (workdir / "started").exists()


def test_kill_needs_the_right_label_and_leaves_finished_tasks_alone(make_queue, workdir):
    queue = make_queue({"gpu": 2})
    running = queue.submit(request(workdir, "sleep 300", label="mine"))
    finished = queue.submit(request(workdir, "exit 2", label="done"))
    wait_until_finished(queue, [finished])

    wrong = queue.kill(running, "somebody-else")
    assert wrong.confirmed and wrong.task is None and "somebody-else" in wrong.message
    assert queue.snapshot().tasks[running].state is TaskState.RUNNING

    again = queue.kill(finished, "done")
    assert again.confirmed and (again.task.result, again.task.exit_code) == (TaskResult.FAILED, 2)


def test_log_tail(make_queue, workdir):
    queue = make_queue({"gpu": 1})
    short = queue.submit(request(workdir, "for i in $(seq 1 30); do echo line $i; done", label="short"))
    long = queue.submit(request(workdir, "seq 1 20000", label="long"))  # larger than one read block
    waiting = queue.submit(request(workdir, "sleep 300", label="blocker"))
    queued = queue.submit(request(workdir, "echo never", label="queued"))
    wait_until_finished(queue, [short, long])

    assert queue.log_tail(short, "short", lines=3) == "line 28\nline 29\nline 30"
    assert queue.log_tail(short, "short").splitlines() == [f"line {i}" for i in range(16, 31)]
    assert queue.log_tail(long, "long", lines=2) == "19999\n20000"
    assert queue.log_tail(queued, "queued") == ""
    assert queue.log_tail(short, "not-this-label") == ""
    assert queue.snapshot().tasks[waiting].state is TaskState.RUNNING


def test_task_environment_is_minimal(make_queue, workdir, monkeypatch):
    monkeypatch.setenv("MQI_SECRET_CANARY", "do-not-leak")
    queue = make_queue({"gpu": 1})
    task_id = queue.submit(request(workdir, "env", label="env", CUDA_VISIBLE_DEVICES="1"))
    wait_until_finished(queue, [task_id])

    variables = dict(line.split("=", 1) for line in queue.log_tail(task_id, "env", lines=100).splitlines())
    assert variables["CUDA_VISIBLE_DEVICES"] == "1"
    assert variables["PATH"] == os.environ["PATH"]
    assert "MQI_SECRET_CANARY" not in variables and "PYTHONPATH" not in variables
    assert set(variables) <= {"PATH", "HOME", "CUDA_VISIBLE_DEVICES", "PWD", "OLDPWD", "SHLVL", "_"}


def test_missing_workdir_fails_to_spawn(make_queue, tmp_path):
    queue = make_queue({"gpu": 1})
    missing = tmp_path / "no-such-case"
    task_id = queue.submit(request(missing, "true"))
    task = wait_until_finished(queue, [task_id])[task_id]
    assert task.result is TaskResult.FAILED_TO_SPAWN
    assert str(missing) in task.spawn_error


def test_submit_is_idempotent_per_label_and_checks_the_group(make_queue, workdir):
    queue = make_queue({"gpu": 1})
    first = queue.submit(request(workdir, "exit 0", label="case-a1"))
    assert queue.submit(request(workdir, "exit 0", label="case-a1")) == first
    second = queue.submit(request(workdir, "exit 0", label="case-a2"))
    assert second > first
    with pytest.raises(QueueError, match="'cpu'"):
        queue.submit(request(workdir, "exit 0", group="cpu"))
    groups = queue.snapshot().groups
    assert (groups["gpu"].parallel, groups["gpu"].paused) == (1, False)
    assert queue.missing_or_paused_groups(["gpu", "cpu"]) == {"cpu": "missing"}


def test_groups_need_at_least_one_slot(tmp_path):
    with pytest.raises(ConfigError, match="'gpu'"):
        LocalQueue(tmp_path, {"gpu": 0})


def test_concurrent_submitters_get_distinct_ids(tmp_path, workdir):
    root = tmp_path / "queue"
    script = (
        "import sys; from pathlib import Path\n"
        "from mqi.queue.local import LocalQueue\n"
        "from mqi.queue.base import SubmitRequest\n"
        f"queue = LocalQueue(Path({str(root)!r}), {{'gpu': 1}})\n"
        "for n in range(5):\n"
        f"    print(queue.submit(SubmitRequest(f'{{sys.argv[1]}}-{{n}}', 'gpu', {str(workdir)!r}, 'true')))\n"
    )
    submitters = [subprocess.Popen([sys.executable, "-c", script, name], stdout=subprocess.PIPE, text=True)
                  for name in ("a", "b")]
    ids = [int(line) for process in submitters for line in process.communicate(timeout=60)[0].split()]
    assert sorted(ids) == list(range(10))
    tasks = wait_until_finished(LocalQueue(root, {"gpu": 1}), ids)
    assert all(task.result is TaskResult.SUCCESS for task in tasks.values())


def test_vanished_task_is_recorded_as_errored(make_queue, workdir):
    """After a reboot the recorded processes are gone and nothing wrote the exit file."""
    queue = make_queue({"gpu": 1})
    task_id = queue.submit(request(workdir, "sleep 300", label="rebooted"))
    folder = queue.root / "tasks" / str(task_id)
    deadline = time.monotonic() + 10
    while not (folder / "command.json").exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    identities = {name: json.loads((folder / name).read_text()) for name in ("supervisor.json", "command.json")}
    for name, identity in identities.items():
        write_json_atomic(folder / name, {**identity, "boot_id": "before-the-reboot"})
    try:
        task = queue.snapshot().tasks[task_id]
        assert (task.state, task.result) == (TaskState.DONE, TaskResult.ERRORED)
    finally:  # the processes really still run: end them
        os.killpg(identities["command.json"]["pid"], signal.SIGKILL)
        os.kill(identities["supervisor.json"]["pid"], signal.SIGKILL)


def test_process_identity_guards_against_pid_reuse():
    me = ProcessIdentity.of(os.getpid())
    assert me.is_alive()
    assert not replace(me, start_ticks=me.start_ticks + 1).is_alive()
    assert not replace(me, boot_id="another-boot").is_alive()
    child = subprocess.Popen(["true"])
    identity = ProcessIdentity.of(child.pid)
    time.sleep(0.2)  # it has ended but is not reaped: a zombie counts as ended
    assert not identity.is_alive()
    child.wait()
    assert live_group_members(os.getpgid(0))  # our own group has a live member: us


def test_json_is_replaced_atomically(tmp_path):
    path = tmp_path / "exit.json"
    write_json_atomic(path, {"result": "success", "exit_code": 0})
    with open(path) as reader_of_old_file:
        write_json_atomic(path, {"result": "failed", "exit_code": 1})
        assert json.load(reader_of_old_file) == {"result": "success", "exit_code": 0}
    with pytest.raises(TypeError):
        write_json_atomic(path, {"result": object()})  # fails halfway through writing
    assert json.loads(path.read_text()) == {"result": "failed", "exit_code": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["exit.json"]  # no temporary file left
