"""PueueQueue against the pueue stand-in, locally and through a real OpenSSH server."""

from __future__ import annotations

import json
import os
import pwd
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from mqi.queue.base import SubmitRequest, TaskInfo, TaskResult, TaskState
from mqi.queue.pueue import (
    HOST_LOCATION_VARIABLES,
    InvalidRequest,
    PueueCommandFailed,
    PueueQueue,
    UnknownGroup,
)
from mqi.transport.local import LocalTransport
from mqi.transport.ssh import SshTransport

GROUP = "gpu0"
WAIT = 15.0


@pytest.fixture
def pueue_host(fake_pueue):
    fake_pueue.add_group(GROUP, 1)
    return fake_pueue


@pytest.fixture
def local_queue(pueue_host) -> PueueQueue:
    return PueueQueue(LocalTransport("gpu-local"), pueue=str(pueue_host.bin), timeout=20)


@pytest.fixture
def ssh_queue(pueue_host, sshd):
    transport = SshTransport(**sshd.transport_params("gpu-ssh"))
    yield PueueQueue(transport, pueue=str(pueue_host.bin), timeout=20)
    transport.close()


@pytest.fixture(params=["local", "ssh"])
def queue(request) -> PueueQueue:
    """The same behaviour is expected whichever transport reaches the host."""
    return request.getfixturevalue(f"{request.param}_queue")


def submit(queue: PueueQueue, workdir: Path, command: str, label: str = "mqi-c1-a1", **env) -> int:
    request = SubmitRequest(
        label=label, group=GROUP, workdir=str(workdir), command=command, env=env
    )
    return queue.submit(request)


def wait_for(queue: PueueQueue, task_id: int, label: str, condition, timeout: float = WAIT):
    deadline = time.monotonic() + timeout
    while True:
        task = queue.snapshot().find(task_id, label)
        if condition(task):
            return task
        if time.monotonic() > deadline:
            raise AssertionError(f"task {task_id} ({label}) never reached the state; last {task}")
        time.sleep(0.1)


def finished(task: TaskInfo | None) -> bool:
    return task is not None and task.finished


def running(task: TaskInfo | None) -> bool:
    return task is not None and task.state is TaskState.RUNNING


def stored_envs(fake_pueue, task_id: int) -> dict:
    """The environment pueue stored with the task (what anyone can read with `status`)."""
    return fake_pueue.status()["tasks"][str(task_id)]["envs"]


def add_calls(fake_pueue) -> list[list[str]]:
    return [argv for argv in _argvs(fake_pueue) if _subcommand(argv) == "add"]


def _argvs(fake_pueue) -> list[list[str]]:
    return [call["argv"] for call in fake_pueue.calls()]


def _subcommand(argv: list[str]) -> str | None:
    words = [word for word in argv if not word.startswith("-") and word != "never"]
    return words[0] if words else None


def process_alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"  # a zombie is dead, only not yet reaped


# --- submit and status ---


def test_task_runs_in_its_folder_with_its_gpu_and_succeeds(queue, tmp_path):
    task_id = submit(
        queue,
        tmp_path,
        'pwd > where.txt && printf %s "$CUDA_VISIBLE_DEVICES" > gpu.txt',
        CUDA_VISIBLE_DEVICES="3",
        MQI_CASE_UID="c1",
    )
    task = wait_for(queue, task_id, "mqi-c1-a1", finished)
    assert (task.result, task.exit_code) == (TaskResult.SUCCESS, 0)
    assert task.group == GROUP and task.path == str(tmp_path)
    assert task.start is not None and task.end >= task.start
    assert (tmp_path / "where.txt").read_text().strip() == str(tmp_path)
    assert (tmp_path / "gpu.txt").read_text() == "3"


@pytest.mark.parametrize(("command", "exit_code"), [("exit 3", 3), ("no-such-program-mqi", 127)])
def test_exit_codes_are_reported(local_queue, tmp_path, command, exit_code):
    task_id = submit(local_queue, tmp_path, command)
    task = wait_for(local_queue, task_id, "mqi-c1-a1", finished)
    assert (task.result, task.exit_code) == (TaskResult.FAILED, exit_code)


def test_a_second_submit_adopts_the_task_with_the_same_label(queue, pueue_host, tmp_path):
    first = submit(queue, tmp_path, "sleep 30")
    second = submit(queue, tmp_path, "sleep 30")
    assert second == first
    assert len(add_calls(pueue_host)) == 1
    assert list(queue.snapshot().tasks) == [first]
    queue.kill(first, "mqi-c1-a1")


def test_a_new_label_is_added_without_reading_the_status_first(queue, pueue_host, tmp_path):
    """One remote call per first submission: the status (all tasks, large on a busy host) is read
    only to adopt a task of a resumed submission."""
    calls_before = len(pueue_host.calls())
    task_id = queue.submit(SubmitRequest("mqi-new-a1", GROUP, str(tmp_path), "sleep 30", {}), adopt=False)

    assert [_subcommand(argv) for argv in _argvs(pueue_host)[calls_before:]] == ["add"]
    assert queue.snapshot().find(task_id, "mqi-new-a1") is not None
    queue.kill(task_id, "mqi-new-a1")


def test_stored_environment_holds_only_what_we_passed(queue, pueue_host, tmp_path, monkeypatch):
    monkeypatch.setenv("MQI_DB_PASSWORD", "canary-secret")
    monkeypatch.setenv("PREFECT_API_KEY", "canary-key")
    task_id = submit(queue, tmp_path, "true", CUDA_VISIBLE_DEVICES="1", MQI_CASE_UID="c1")
    envs = stored_envs(pueue_host, task_id)
    ours = {"PATH", "CUDA_VISIBLE_DEVICES", "MQI_CASE_UID"}
    # the host's own HOME and XDG locations, and what the daemon adds when it starts the task
    allowed = ours | set(HOST_LOCATION_VARIABLES) | {"PUEUE_GROUP", "PUEUE_WORKER_ID"}
    assert ours <= set(envs) <= allowed
    assert envs["PATH"] == queue.path_env
    assert (envs["CUDA_VISIBLE_DEVICES"], envs["MQI_CASE_UID"]) == ("1", "c1")
    assert "canary" not in json.dumps(envs)


def test_over_ssh_the_task_gets_the_hosts_home_not_ours(
    ssh_queue, pueue_host, tmp_path, monkeypatch
):
    monkeypatch.setenv("HOME", "/nonexistent/home-of-the-orchestrator")
    task_id = submit(ssh_queue, tmp_path, "true")
    assert stored_envs(pueue_host, task_id)["HOME"] == pwd.getpwuid(os.getuid()).pw_dir


def test_the_client_keeps_the_hosts_socket_location(local_queue, pueue_host, tmp_path, monkeypatch):
    # pueue finds its daemon's socket under $XDG_RUNTIME_DIR when that is set
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/run/user/4242")
    task_id = submit(local_queue, tmp_path, "true")
    assert stored_envs(pueue_host, task_id)["XDG_RUNTIME_DIR"] == "/run/user/4242"


def test_unknown_group_names_host_and_group(queue, tmp_path, pueue_host):
    request = SubmitRequest(label="mqi-c1-a1", group="gpu9", workdir=str(tmp_path), command="true")
    for version in ("v3", "v4"):  # v3 prints the refusal on stdout, v4 on stderr
        pueue_host.set_format(version)
        with pytest.raises(UnknownGroup) as caught:
            queue.submit(request)
        assert caught.value.group == "gpu9"
        assert repr(queue.host) in str(caught.value) and "'gpu9'" in str(caught.value)
        assert "doesn't exist" in caught.value.text


def test_invalid_requests_are_refused_before_pueue_is_called(local_queue, pueue_host, tmp_path):
    bad = [
        SubmitRequest("mqi-c1-a1", GROUP, "relative/dir", "true"),
        SubmitRequest("mqi-c1-a1", GROUP, str(tmp_path), "  "),
        SubmitRequest("two\nlines", GROUP, str(tmp_path), "true"),
        SubmitRequest("mqi-c1-a1", GROUP, str(tmp_path), "true", {"1BAD": "x"}),
        SubmitRequest("mqi-c1-a1", GROUP, str(tmp_path), "true", {"PATH": "/evil"}),
        SubmitRequest("mqi-c1-a1", GROUP, str(tmp_path), "true", {"DB_PASSWORD": "s3cret"}),
    ]
    for request in bad:
        with pytest.raises(InvalidRequest) as caught:
            local_queue.submit(request)
        assert "s3cret" not in str(caught.value)
    assert _argvs(pueue_host) == []


def test_shell_syntax_in_arguments_reaches_pueue_verbatim(queue, pueue_host, tmp_path):
    canaries = [tmp_path / f"canary{n}" for n in range(3)]
    label = f"mqi-$(touch {canaries[0]})-a1'; touch {canaries[1]}; echo '"
    command = f"printf '%s' '$(touch {canaries[2]})' > out.txt"
    workdir = tmp_path / "it's a `dir` $HOME"
    workdir.mkdir()
    task_id = submit(queue, workdir, command, label=label, MQI_CASE_UID="$(id)")
    task = wait_for(queue, task_id, label, finished)
    assert task.result is TaskResult.SUCCESS
    assert (task.label, task.command, task.path) == (label, command, str(workdir))
    assert (workdir / "out.txt").read_text() == f"$(touch {canaries[2]})"
    assert stored_envs(pueue_host, task_id)["MQI_CASE_UID"] == "$(id)"
    assert not any(canary.exists() for canary in canaries)


# --- kill ---


def test_kill_confirms_and_the_processes_are_gone(queue, pueue_host, tmp_path):
    task_id = submit(queue, tmp_path, "sleep 300 & echo $! > child.pid; wait")
    wait_for(queue, task_id, "mqi-c1-a1", running)
    child = _wait_for_pid(tmp_path / "child.pid")
    outcome = queue.kill(task_id, "mqi-c1-a1", confirm_timeout=WAIT)
    assert outcome.confirmed, outcome.message
    assert outcome.task.result is TaskResult.KILLED
    assert not process_alive(child)
    _assert_never_killed_by_group(pueue_host)


def test_kill_of_a_queued_task_removes_it_so_it_never_starts(local_queue, pueue_host, tmp_path):
    blocker = submit(local_queue, tmp_path, "sleep 300", label="mqi-c1-a1")
    wait_for(local_queue, blocker, "mqi-c1-a1", running)
    queued = submit(local_queue, tmp_path, "touch started", label="mqi-c2-a1")
    assert local_queue.snapshot().tasks[queued].state is TaskState.QUEUED
    outcome = local_queue.kill(queued, "mqi-c2-a1", confirm_timeout=WAIT)
    assert outcome.confirmed and outcome.task is None, outcome.message
    assert queued not in local_queue.snapshot().tasks
    assert local_queue.kill(blocker, "mqi-c1-a1").confirmed
    time.sleep(1.0)  # a few daemon loops: the group is free now
    assert not (tmp_path / "started").exists()
    _assert_never_killed_by_group(pueue_host)


def test_kill_never_touches_a_reused_id(local_queue, pueue_host, tmp_path):
    old = submit(local_queue, tmp_path, "true", label="mqi-old-a1")
    wait_for(local_queue, old, "mqi-old-a1", finished)
    pueue_host.clean()
    new = submit(local_queue, tmp_path, "sleep 300", label="mqi-new-a1")
    assert new == old  # pueue reuses ids after a clean
    wait_for(local_queue, new, "mqi-new-a1", running)
    assert local_queue.snapshot().find(old, "mqi-old-a1") is None
    outcome = local_queue.kill(old, "mqi-old-a1")
    assert outcome.confirmed and outcome.task is None
    assert local_queue.snapshot().tasks[new].state is TaskState.RUNNING
    assert not [argv for argv in _argvs(pueue_host) if _subcommand(argv) == "kill"]
    local_queue.kill(new, "mqi-new-a1")


def test_kill_unconfirmed_when_the_task_is_still_running_at_the_deadline(local_queue, tmp_path):
    task_id = submit(local_queue, tmp_path, "sleep 300")
    wait_for(local_queue, task_id, "mqi-c1-a1", running)
    outcome = local_queue.kill(task_id, "mqi-c1-a1", confirm_timeout=0)
    assert not outcome.confirmed
    assert "still running" in outcome.message
    assert local_queue.kill(task_id, "mqi-c1-a1").confirmed


def test_kill_unconfirmed_when_the_host_cannot_be_reached(pueue_host, sshd_factory):
    server = sshd_factory()
    params = server.transport_params("gpu-down")
    transport = SshTransport(**params, connect_attempts=1, connect_timeout=2)
    queue = PueueQueue(transport, pueue=str(pueue_host.bin), timeout=5)
    server.stop()
    outcome = queue.kill(4, "mqi-c1-a1", confirm_timeout=1)
    assert not outcome.confirmed and outcome.task is None
    assert "gpu-down" in outcome.message
    transport.close()


# --- log ---


def test_log_tail_gives_the_last_lines_of_our_task_only(local_queue, tmp_path):
    task_id = submit(local_queue, tmp_path, "for i in $(seq 1 30); do echo line $i; done")
    wait_for(local_queue, task_id, "mqi-c1-a1", finished)
    tail = local_queue.log_tail(task_id, "mqi-c1-a1", lines=3)
    assert tail.splitlines() == ["line 28", "line 29", "line 30"]
    assert local_queue.log_tail(task_id, "somebody-else") == ""
    assert local_queue.log_tail(task_id + 7, "mqi-c1-a1") == ""


def test_log_tails_of_several_tasks_are_one_pueue_call(local_queue, pueue_host, tmp_path):
    first = submit(local_queue, tmp_path, "echo first; echo 1 of 2", label="mqi-c1-a1")
    second = submit(local_queue, tmp_path, "echo second", label="mqi-c2-a1")
    wait_for(local_queue, first, "mqi-c1-a1", finished)
    wait_for(local_queue, second, "mqi-c2-a1", finished)
    calls_before = len(pueue_host.calls())

    tails = local_queue.log_tails({first: "mqi-c1-a1", second: "mqi-c2-a1", second + 7: "mqi-c9-a1"}, lines=5)

    assert tails == {first: "first\n1 of 2", second: "second", second + 7: ""}
    [call] = pueue_host.calls()[calls_before:]
    assert call["argv"][2:5] == ["log", str(first), str(second)]
    assert local_queue.log_tails({second: "somebody-else"}) == {second: ""}


def test_log_tail_of_a_task_not_started_is_empty(local_queue, tmp_path):
    blocker = submit(local_queue, tmp_path, "sleep 300", label="mqi-c1-a1")
    waiting = submit(local_queue, tmp_path, "echo hi", label="mqi-c2-a1")
    assert local_queue.log_tail(waiting, "mqi-c2-a1") == ""
    local_queue.kill(waiting, "mqi-c2-a1")
    local_queue.kill(blocker, "mqi-c1-a1")


# --- both formats, odd clients ---


@pytest.mark.parametrize("version", ["v3", "v4"])
def test_both_formats_and_a_version_warning(local_queue, pueue_host, tmp_path, version):
    pueue_host.configure(format=version, version_mismatch=True)
    task_id = submit(local_queue, tmp_path, "exit 2")
    task = wait_for(local_queue, task_id, "mqi-c1-a1", finished)
    assert (task.result, task.exit_code) == (TaskResult.FAILED, 2)
    assert local_queue.snapshot().groups[GROUP].parallel == 1


@pytest.mark.parametrize(
    "clock",
    [
        {"utc_offset_minutes": -330, "fraction_digits": 0},
        {"utc_offset_minutes": 0, "use_z": True, "fraction_digits": 3},
        {"utc_offset_minutes": 120, "fraction_digits": 9},
    ],
)
def test_daemon_clocks_in_any_offset_give_utc_times(local_queue, pueue_host, tmp_path, clock):
    pueue_host.configure(**clock)
    before = datetime.now(timezone.utc) - timedelta(seconds=1)
    task_id = submit(local_queue, tmp_path, "true")
    task = wait_for(local_queue, task_id, "mqi-c1-a1", finished)
    after = datetime.now(timezone.utc) + timedelta(seconds=1)
    assert before <= task.created_at <= task.start <= task.end <= after
    assert task.end.utcoffset() == timedelta(0)


def test_daemon_down_is_a_clear_error_and_a_kill_stays_unconfirmed(local_queue, pueue_host):
    pueue_host.stop_daemon()
    with pytest.raises(PueueCommandFailed, match="host 'gpu-local'.*connect to the daemon"):
        local_queue.snapshot()
    outcome = local_queue.kill(0, "mqi-c1-a1", confirm_timeout=1)
    assert not outcome.confirmed and "connect to the daemon" in outcome.message


def test_missing_working_directory(local_queue, pueue_host, tmp_path):
    missing = tmp_path / "gone"
    pueue_host.set_format("v4")  # 4.0.3+ refuses at once
    with pytest.raises(PueueCommandFailed, match="working directory"):
        submit(local_queue, missing, "true")
    pueue_host.set_format("v3")  # v3 accepts, and the task cannot start
    task_id = submit(local_queue, missing, "true")
    task = wait_for(local_queue, task_id, "mqi-c1-a1", finished)
    assert task.result is TaskResult.FAILED_TO_SPAWN and task.spawn_error


def test_pueue_not_found_is_a_clear_error(tmp_path):
    queue = PueueQueue(LocalTransport("gpu-local"), pueue=str(tmp_path / "no-pueue"))
    with pytest.raises(PueueCommandFailed, match="right path of pueue") as caught:
        queue.snapshot()
    assert caught.value.exit_code == 127


# --- groups ---


def test_ensure_groups_adds_and_resizes_but_only_reports_a_paused_group(local_queue, pueue_host):
    pueue_host.add_group("gpu1", 1)
    pueue_host.add_group("gpu2", 2)
    pueue_host.pause_group("gpu2")
    report = local_queue.ensure_groups({GROUP: 1, "gpu1": 3, "gpu2": 2, "gpu3": 2})
    assert report == {"gpu1": "parallel 1 -> 3", "gpu2": "paused", "gpu3": "added"}
    groups = local_queue.groups()
    assert (groups["gpu1"].parallel, groups["gpu3"].parallel) == (3, 2)
    assert groups["gpu2"].paused
    assert local_queue.missing_or_paused_groups([GROUP, "gpu2", "gpu9"]) == {
        "gpu2": "paused",
        "gpu9": "missing",
    }


def test_after_a_daemon_restart_running_tasks_are_killed(local_queue, pueue_host, tmp_path):
    task_id = submit(local_queue, tmp_path, "sleep 300")
    wait_for(local_queue, task_id, "mqi-c1-a1", running)
    pueue_host.restart_daemon()
    task = wait_for(local_queue, task_id, "mqi-c1-a1", finished)
    assert task.result is TaskResult.KILLED


def test_the_daemons_start_is_read_from_its_pid_file_over_ssh(ssh_queue, pueue_host):
    """What a restart leaves as evidence: the start of the `pueued` the pid file names, from
    the kernel, and the host's clock beside it; a new daemon, a new start."""
    queue = PueueQueue(ssh_queue.transport, pueue=str(pueue_host.bin), pid_file=str(pueue_host.store.pid_file))
    first = queue.daemon_start()
    # well inside the rule's one-second slack (10 ms on an idle host; this one may be busy)
    assert abs(first.started_at.timestamp() - _kernel_start(pueue_host.store.daemon_pid())) < 0.2
    assert abs(first.clock_offset) <= first.uncertainty + timedelta(seconds=0.05)  # one machine: one clock
    pueue_host.restart_daemon(graceful=False)
    before_restart_ended = time.time()
    second = queue.daemon_start()
    assert first.started_at < second.started_at <= datetime.fromtimestamp(before_restart_ended, timezone.utc)


def test_the_daemons_pid_file_is_found_in_pueues_default_places(pueue_host, tmp_path, monkeypatch):
    """$XDG_RUNTIME_DIR/pueue.pid first (v4), then the pueue directory; a file naming a process
    that is not a running `pueued` (a stale file, a reused pid) does not count."""
    runtime, data = tmp_path / "run", tmp_path / "data"
    (data / "pueue").mkdir(parents=True)
    runtime.mkdir()
    (runtime / "pueue.pid").write_text(str(os.getpid()))  # alive, ours, but not a pueued
    (data / "pueue" / "pueue.pid").symlink_to(pueue_host.store.pid_file)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    monkeypatch.setenv("XDG_DATA_HOME", str(data))
    queue = PueueQueue(LocalTransport("gpu-local"), pueue=str(pueue_host.bin))
    start = queue.daemon_start()
    assert abs(start.started_at.timestamp() - _kernel_start(pueue_host.store.daemon_pid())) < 0.2
    (data / "pueue" / "pueue.pid").unlink()
    assert queue.daemon_start() is None
    pueue_host.stop_daemon()
    missing = PueueQueue(LocalTransport("gpu-local"), pueue=str(pueue_host.bin), pid_file=str(pueue_host.store.pid_file))
    assert missing.daemon_start() is None  # pueue removes its pid file when it stops


def test_start_group_resumes_a_paused_group(queue, pueue_host, tmp_path):
    pueue_host.pause_group(GROUP)
    task_id = submit(queue, tmp_path, "true")
    time.sleep(0.5)  # two daemon loops: time enough to start it, were the group running
    assert queue.snapshot().find(task_id, "mqi-c1-a1").state is TaskState.QUEUED
    queue.start_group(GROUP)
    assert not queue.groups()[GROUP].paused
    assert wait_for(queue, task_id, "mqi-c1-a1", finished).result is TaskResult.SUCCESS


def _kernel_start(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as stat:
        ticks = int(stat.read().rpartition(")")[2].split()[19])
    before, now, after = _uptime(), time.time(), _uptime()
    return now - (before + after) / 2 + ticks / os.sysconf("SC_CLK_TCK")


def _uptime() -> float:
    with open("/proc/uptime") as uptime:
        return float(uptime.read().split()[0])


# --- helpers ---


def _wait_for_pid(path: Path) -> int:
    deadline = time.monotonic() + WAIT
    while not path.exists() or not path.read_text().strip():
        assert time.monotonic() < deadline, f"{path} never written"
        time.sleep(0.05)
    return int(path.read_text())


def _assert_never_killed_by_group(fake_pueue) -> None:
    for argv in _argvs(fake_pueue):
        if _subcommand(argv) == "kill":
            tail = argv[argv.index("kill") + 1 :]
            assert tail and all(word.isdigit() for word in tail), argv
