"""The pueue stand-in behaves as /work/shared/pueue/INTERFACE.md describes pueue.

The production pueue client is tested against this stand-in, so these tests pin down the
behaviour it relies on: outputs, exit codes, both JSON formats, timing of kills, id reuse,
restarts, parallel limits, and the records kept for tests and benchmarks.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest

from mqi.queue.pueue_json import parse_timestamp
from tests.support.pueue_fixtures import FakePueue, install_fake_pueue

SHARED_PUEUE = Path(__file__).resolve().parents[1] / ".." / "shared" / "pueue"
WAIT = 10.0

V3_TASK_FIELDS = (
    "id created_at enqueued_at original_command command path envs group dependencies "
    "priority label status prev_status start end"
).split()
V4_TASK_FIELDS = (
    "id created_at original_command command path envs group dependencies priority label status"
).split()
RFC3339 = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,9})?(Z|[+-]\d\d:\d\d)$")


# -- helpers -----------------------------------------------------------------------------
def add(pueue: FakePueue, command: str, *options: str, cwd=None, env=None) -> int:
    result = pueue.run("add", "-p", *options, "--", command, cwd=cwd, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    return int(result.stdout.strip().splitlines()[-1])


def task(pueue: FakePueue, task_id: int) -> dict:
    return pueue.status()["tasks"][str(task_id)]


def status_name(pueue: FakePueue, task_id: int) -> str:
    status = task(pueue, task_id)["status"]
    return status if isinstance(status, str) else next(iter(status))


def wait_for_status(pueue: FakePueue, task_id: int, wanted: str, timeout: float = WAIT) -> dict:
    deadline = time.monotonic() + timeout
    while status_name(pueue, task_id) != wanted:
        assert time.monotonic() < deadline, f"task {task_id} never became {wanted}: {task(pueue, task_id)}"
        time.sleep(0.05)
    return task(pueue, task_id)


def result_of(pueue: FakePueue, task_id: int):
    done = wait_for_status(pueue, task_id, "Done")["status"]["Done"]
    is_v4 = isinstance(done, dict) and "result" in done  # v3: {"Done": <result>}
    return done["result"] if is_v4 else done


def process_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rpartition(")")[2].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.fixture
def v3_pueue(fake_pueue) -> FakePueue:
    fake_pueue.set_format("v3")
    return fake_pueue


# -- add and status ----------------------------------------------------------------------
def test_add_prints_the_id_and_status_shows_the_task(fake_pueue, tmp_path):
    result = fake_pueue.run("add", "-l", "case-1", "-w", str(tmp_path), "--", "sleep", "0")
    assert (result.returncode, result.stdout) == (0, "New task added (id 0).\n")
    assert add(fake_pueue, "true") == 1

    shown = fake_pueue.run("status", "--json")
    assert shown.returncode == 0 and shown.stdout.count("\n") == 1  # one line of compact JSON
    first = json.loads(shown.stdout)["tasks"]["0"]
    assert (first["label"], first["path"], first["group"]) == ("case-1", str(tmp_path), "default")
    assert (first["command"], first["original_command"]) == ("sleep 0", "sleep 0")


def test_add_joins_words_with_single_spaces_and_escape_quotes_them(fake_pueue):
    fake_pueue.pause_group("default")
    joined = fake_pueue.run("add", "-p", "--", "echo", "a b", "c")
    escaped = fake_pueue.run("add", "-p", "-e", "--", "echo", "a b", "c")
    tasks = fake_pueue.status()["tasks"]
    assert tasks[joined.stdout.strip()]["command"] == "echo a b c"
    assert tasks[escaped.stdout.strip()]["command"] == "echo 'a b' c"


def test_add_records_the_callers_whole_environment_and_tasks_get_only_that(fake_pueue, tmp_path):
    env = {"PATH": "/usr/bin:/bin", "MQI_CASE": "c7"}
    task_id = add(fake_pueue, "env | sort", "-w", str(tmp_path), env=env)
    assert task(fake_pueue, task_id)["envs"] == env
    assert result_of(fake_pueue, task_id) == "Success"
    output = json.loads(fake_pueue.run("log", str(task_id), "--json").stdout)[str(task_id)]["output"]
    variables = dict(line.split("=", 1) for line in output.splitlines())
    assert variables["PUEUE_GROUP"] == "default" and variables["PUEUE_WORKER_ID"] == "0"
    assert variables["MQI_CASE"] == "c7" and variables["PWD"] == str(tmp_path)
    assert "HOME" not in variables  # nothing leaks from the daemon's own environment


def test_add_to_a_paused_group_says_so_except_with_print_task_id(fake_pueue):
    fake_pueue.pause_group("default")
    result = fake_pueue.run("add", "--", "true")
    assert result.stdout == "New task added (id 0).\nThe group of this task is currently paused!\n"
    assert fake_pueue.run("add", "-p", "--", "true").stdout == "1\n"


@pytest.mark.parametrize("fmt, stream", [("v3", "stdout"), ("v4", "stderr")])
def test_unknown_group_is_refused_on_the_formats_stream(fake_pueue, fmt, stream):
    fake_pueue.set_format(fmt)
    fake_pueue.add_group("gpu0", 1)
    result = fake_pueue.run("add", "-g", "gpu", "--", "true")
    assert result.returncode == 1
    assert getattr(result, stream) == 'Group gpu doesn\'t exists. Use one of these: ["default", "gpu0"]\n'
    assert fake_pueue.status()["tasks"] == {}


def test_missing_working_directory_is_refused_in_v4(fake_pueue, tmp_path):
    result = fake_pueue.run("add", "-w", str(tmp_path / "absent"), "--", "true")
    assert result.returncode == 1 and "working directory" in result.stderr
    assert fake_pueue.status()["tasks"] == {}


def test_priority_then_id_decide_the_start_order(fake_pueue):
    fake_pueue.pause_group("default")
    low = add(fake_pueue, "true", "--priority=-1")
    normal = add(fake_pueue, "true")
    high = add(fake_pueue, "true", "-o", "5")
    fake_pueue.start_group("default")
    for task_id in (low, normal, high):
        result_of(fake_pueue, task_id)
    starts = [record["id"] for record in fake_pueue.task_history() if record["event"] == "start"]
    assert starts == [high, normal, low]


def test_after_waits_for_dependencies_and_fails_with_them(fake_pueue):
    fake_pueue.add_group("wide", 4)
    slow = add(fake_pueue, "sleep 0.5", "-g", "wide")
    failing = add(fake_pueue, "exit 1", "-g", "wide")
    waiter = add(fake_pueue, "true", "-g", "wide", "-a", str(slow))
    doomed = add(fake_pueue, "true", "-g", "wide", "--after", str(failing), str(slow))
    assert task(fake_pueue, waiter)["dependencies"] == [slow]
    assert result_of(fake_pueue, waiter) == "Success"
    assert result_of(fake_pueue, doomed) == "DependencyFailed"
    history = fake_pueue.task_history()
    slow_end = next(r["time"] for r in history if r["event"] == "end" and r["id"] == slow)
    waiter_start = next(r["time"] for r in history if r["event"] == "start" and r["id"] == waiter)
    assert waiter_start >= slow_end
    assert not any(r["id"] == doomed for r in history)  # never started


def test_immediate_starts_despite_a_paused_group(fake_pueue):
    fake_pueue.pause_group("default")
    task_id = add(fake_pueue, "true", "-i")
    assert result_of(fake_pueue, task_id) == "Success"


# -- command line usage ----------------------------------------------------------------------
@pytest.mark.parametrize(
    "args",
    [
        ["status", "--json", "--color", "never"],  # --color only before the subcommand
        ["add", "-o", "-1", "--", "true"],  # a negative priority needs --priority=-1
        ["add", "-a", "0", "true"],  # --after is greedy: it swallowed the command
        ["add"],
        ["kill", "x"],
        ["frobnicate"],
    ],
)
def test_usage_errors_exit_2(fake_pueue, args):
    fake_pueue.pause_group("default")
    add(fake_pueue, "true")
    result = subprocess.run([str(fake_pueue.bin), *args], capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.startswith("error: ")
    assert len(fake_pueue.status()["tasks"]) == 1


def test_client_fails_when_the_daemon_is_down(fake_pueue):
    fake_pueue.stop_daemon()
    result = fake_pueue.run("status", "--json")
    assert result.returncode == 1 and result.stdout == ""
    assert "daemon" in result.stderr


def test_pueued_d_starts_a_background_daemon(tmp_path):
    pueue = install_fake_pueue(tmp_path)
    started = subprocess.run([str(pueue.daemon_bin), "-d"], capture_output=True, text=True, timeout=20)
    try:
        assert started.returncode == 0
        assert pueue.run("status", "--json").returncode == 0
        again = subprocess.run([str(pueue.daemon_bin), "-d"], capture_output=True, text=True, timeout=20)
        assert again.returncode == 1 and "running" in again.stderr
    finally:
        pueue.stop_daemon()


def test_version_flag_names_the_major_version(fake_pueue):
    assert fake_pueue.run("--version").stdout == "pueue 4.0.4\n"
    fake_pueue.set_format("v3")
    assert fake_pueue.run("--version").stdout == "pueue 3.4.1\n"


# -- results ----------------------------------------------------------------------------------
def test_exit_codes_become_results(fake_pueue, tmp_path):
    fake_pueue.add_group("wide", 4)
    expected = {
        "exit 0": "Success",
        "exit 3": {"Failed": 3},
        "no_such_program_xyz": {"Failed": 127},
        "kill -9 $$": "Killed",
    }
    ids = {command: add(fake_pueue, command, "-g", "wide", "-w", str(tmp_path)) for command in expected}
    assert {command: result_of(fake_pueue, ids[command]) for command in expected} == expected


def test_vanished_working_directory_fails_to_spawn(fake_pueue, tmp_path):
    workdir = tmp_path / "case"
    workdir.mkdir()
    fake_pueue.pause_group("default")
    task_id = add(fake_pueue, "true", "-w", str(workdir))
    workdir.rmdir()
    fake_pueue.start_group("default")
    result = result_of(fake_pueue, task_id)
    assert list(result) == ["FailedToSpawn"] and "No such file or directory" in result["FailedToSpawn"]


def test_v3_accepts_a_missing_working_directory_and_fails_to_spawn(v3_pueue, tmp_path):
    task_id = add(v3_pueue, "true", "-w", str(tmp_path / "absent"))
    assert list(result_of(v3_pueue, task_id)) == ["FailedToSpawn"]


# -- kill ----------------------------------------------------------------------------------------
def test_kill_reaches_the_whole_process_group_and_is_seen_on_the_next_loop(fake_pueue, tmp_path):
    pid_file = tmp_path / "child.pid"
    task_id = add(fake_pueue, f"sleep 60 & echo $! > {pid_file}; wait")
    wait_for_status(fake_pueue, task_id, "Running")
    deadline = time.monotonic() + WAIT
    while not pid_file.exists() or not pid_file.read_text().strip():
        assert time.monotonic() < deadline
        time.sleep(0.02)
    child = int(pid_file.read_text())

    killed_at = time.monotonic()
    result = fake_pueue.run("kill", str(task_id))
    assert (result.returncode, result.stdout) == (0, f"Tasks are being killed: {task_id}\n")
    seen = status_name(fake_pueue, task_id)
    if time.monotonic() - killed_at < 0.25:
        assert seen == "Running"  # a poll right after the kill: the daemon has not said yet
    assert result_of(fake_pueue, task_id) == "Killed"
    assert time.monotonic() - killed_at < 1.5
    deadline = time.monotonic() + WAIT
    while process_alive(child):
        assert time.monotonic() < deadline, "the task's child survived the kill"
        time.sleep(0.02)


def test_kill_of_tasks_not_running_fails_and_leaves_them(fake_pueue):
    running = add(fake_pueue, "sleep 60")
    queued = add(fake_pueue, "true")
    wait_for_status(fake_pueue, running, "Running")

    none = fake_pueue.run("kill", str(queued), "99")
    assert (none.returncode, none.stderr) == (1, f"The command failed for tasks: {queued}, 99\n")
    assert status_name(fake_pueue, queued) == "Queued"

    mixed = fake_pueue.run("kill", str(running), str(queued))
    assert mixed.returncode == 0
    assert mixed.stdout == f"Tasks are being killed: {running}\nThe command failed for tasks: {queued}\n"
    assert result_of(fake_pueue, running) == "Killed"


def test_v3_prints_failures_to_stdout(v3_pueue):
    result = v3_pueue.run("kill", "5")
    assert (result.returncode, result.stdout, result.stderr) == (1, "The command failed for tasks: 5\n", "")


def test_kill_by_group_also_pauses_it_and_bare_kill_means_default(fake_pueue):
    fake_pueue.add_group("gpu0", 1)
    other = add(fake_pueue, "sleep 60", "-g", "gpu0")
    mine = add(fake_pueue, "sleep 60")
    wait_for_status(fake_pueue, mine, "Running")
    wait_for_status(fake_pueue, other, "Running")
    assert fake_pueue.run("kill").returncode == 0
    assert result_of(fake_pueue, mine) == "Killed"
    groups = fake_pueue.status()["groups"]
    assert groups["default"]["status"] == "Paused" and groups["gpu0"]["status"] == "Running"
    assert status_name(fake_pueue, other) == "Running"
    fake_pueue.run("kill", "-g", "gpu0")
    assert result_of(fake_pueue, other) == "Killed"


def test_pause_and_start_stop_and_resume_a_running_task(fake_pueue, tmp_path):
    marker = tmp_path / "ticks"
    task_id = add(fake_pueue, f"while true; do echo x >> {marker}; sleep 0.05; done")
    wait_for_status(fake_pueue, task_id, "Running")
    assert fake_pueue.run("pause", "-g", "default").stdout == 'Group "default" is being paused.\n'
    assert status_name(fake_pueue, task_id) == "Paused"
    time.sleep(0.2)
    size = marker.stat().st_size
    time.sleep(0.3)
    assert marker.stat().st_size == size  # stopped
    fake_pueue.start_group("default")
    assert status_name(fake_pueue, task_id) == "Running"
    fake_pueue.run("kill", str(task_id))
    assert result_of(fake_pueue, task_id) == "Killed"


# -- log -----------------------------------------------------------------------------------------
def test_log_json_tails_output_and_leaves_out_unknown_ids(fake_pueue):
    task_id = add(fake_pueue, "seq 1 40; echo oops >&2")
    result_of(fake_pueue, task_id)

    def output(*options: str) -> str:
        result = fake_pueue.run("log", str(task_id), "--json", *options)
        entry = json.loads(result.stdout)[str(task_id)]
        assert entry["task"]["envs"] == {} and entry["task"]["id"] == task_id
        return entry["output"]

    assert output().splitlines() == [str(n) for n in range(27, 41)] + ["oops"]
    assert output("--lines", "2").splitlines() == ["40", "oops"]
    assert output("--full").splitlines()[0] == "1"
    assert fake_pueue.run("log", "42", "--json").stdout == "{}\n"


def test_log_of_a_task_not_started_is_a_pueue_error_text(fake_pueue):
    fake_pueue.pause_group("default")
    task_id = add(fake_pueue, "true")
    result = fake_pueue.run("log", str(task_id), "--json")
    assert result.returncode == 0
    assert json.loads(result.stdout)[str(task_id)]["output"].startswith("(Pueue error)")


# -- groups ---------------------------------------------------------------------------------------
def test_group_commands(fake_pueue):
    assert fake_pueue.run("group").stdout == 'Group "default" (1 parallel): running\n'
    created = fake_pueue.run("group", "add", "gpu0", "--parallel", "2")
    assert (created.returncode, created.stdout) == (0, 'New group "gpu0" has been created\n')
    again = fake_pueue.run("group", "add", "gpu0")
    assert (again.returncode, again.stderr) == (1, 'Group "gpu0" already exists\n')
    assert fake_pueue.run("parallel", "3", "-g", "gpu0").returncode == 0
    fake_pueue.pause_group("gpu0")
    groups = json.loads(fake_pueue.run("group", "--json").stdout)
    assert groups == {
        "default": {"status": "Running", "parallel_tasks": 1},
        "gpu0": {"status": "Paused", "parallel_tasks": 3},
    }
    assert fake_pueue.run("parallel", "2", "-g", "nope").returncode == 1


def test_status_group_filter_keeps_all_groups_and_unknown_gives_no_tasks(fake_pueue):
    fake_pueue.add_group("gpu0", 1)
    fake_pueue.pause_group("default")
    fake_pueue.pause_group("gpu0")
    add(fake_pueue, "true")
    theirs = add(fake_pueue, "true", "-g", "gpu0")
    filtered = json.loads(fake_pueue.run("status", "--json", "--group", "gpu0").stdout)
    assert list(filtered["tasks"]) == [str(theirs)] and set(filtered["groups"]) == {"default", "gpu0"}
    unknown = fake_pueue.run("status", "--json", "-g", "nope")
    assert unknown.returncode == 0 and json.loads(unknown.stdout)["tasks"] == {}


def test_parallel_limit_is_honoured(fake_pueue):
    fake_pueue.add_group("pair", 2)
    ids = [add(fake_pueue, "sleep 0.3", "-g", "pair", "-l", f"t{n}") for n in range(5)]
    for task_id in ids:
        assert result_of(fake_pueue, task_id) == "Success"
    assert fake_pueue.max_concurrent("pair") == 2
    workers = {r["worker_id"] for r in fake_pueue.task_history() if r["event"] == "start"}
    assert workers == {0, 1}
    gaps = fake_pueue.idle_gaps("pair")
    assert gaps and all(0 <= gap < 1.0 for gap in gaps)


# -- removal and ids ---------------------------------------------------------------------------------
def test_clean_removes_finished_tasks_and_ids_are_reused(fake_pueue):
    first = add(fake_pueue, "true", "-l", "old")
    second = add(fake_pueue, "true")
    result_of(fake_pueue, second)
    assert fake_pueue.run("clean").stdout == "All finished tasks have been removed\n"
    assert fake_pueue.status()["tasks"] == {}
    reused = add(fake_pueue, "true", "-l", "new")
    assert reused == first == 0 and task(fake_pueue, reused)["label"] == "new"


def test_remove_drops_queued_and_finished_but_not_running_tasks(fake_pueue):
    running = add(fake_pueue, "sleep 60")
    queued = add(fake_pueue, "true")
    wait_for_status(fake_pueue, running, "Running")
    result = fake_pueue.run("remove", str(queued), str(running))
    assert result.stdout == f"Tasks removed from list: {queued}\nThe command failed for tasks: {running}\n"
    assert list(fake_pueue.status()["tasks"]) == [str(running)]


def test_reset_kills_and_forgets_everything(fake_pueue):
    running = add(fake_pueue, "sleep 60")
    add(fake_pueue, "true")
    wait_for_status(fake_pueue, running, "Running")
    assert fake_pueue.run("reset", "-f").returncode == 0
    deadline = time.monotonic() + WAIT
    while fake_pueue.status()["tasks"]:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert fake_pueue.status()["groups"]["default"]["status"] == "Running"
    assert add(fake_pueue, "true") == 0


# -- daemon restarts -------------------------------------------------------------------------------
def test_restart_kills_running_tasks_and_pauses_groups_with_queued_ones(fake_pueue):
    fake_pueue.add_group("idle", 1)
    running = add(fake_pueue, "sleep 60")
    queued = add(fake_pueue, "true")
    wait_for_status(fake_pueue, running, "Running")
    fake_pueue.restart_daemon()
    assert result_of(fake_pueue, running) == "Killed"
    groups = fake_pueue.status()["groups"]
    assert groups["default"]["status"] == "Paused" and groups["idle"]["status"] == "Running"
    time.sleep(0.5)
    assert status_name(fake_pueue, queued) == "Queued"
    fake_pueue.start_group("default")
    assert result_of(fake_pueue, queued) == "Success"


def test_after_a_daemon_crash_the_next_start_kills_leftover_tasks(fake_pueue):
    task_id = add(fake_pueue, "sleep 60")
    wait_for_status(fake_pueue, task_id, "Running")
    pid = next(r["pid"] for r in fake_pueue.task_history() if r["event"] == "start")
    fake_pueue.stop_daemon(graceful=False)
    assert process_alive(pid)
    fake_pueue.start_daemon()
    assert result_of(fake_pueue, task_id) == "Killed"
    deadline = time.monotonic() + WAIT
    while process_alive(pid):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert [r["event"] for r in fake_pueue.task_history()] == ["start", "end"]


def _process_start(pid: int) -> float:
    """The kernel's start of a process, on the epoch clock."""
    with open(f"/proc/{pid}/stat") as stat:
        ticks = int(stat.read().rpartition(")")[2].split()[19])
    before, now, after = _uptime(), time.time(), _uptime()
    return now - (before + after) / 2 + ticks / os.sysconf("SC_CLK_TCK")


def _uptime() -> float:
    with open("/proc/uptime") as uptime:
        return float(uptime.read().split()[0])


def _done(pueue: FakePueue, task_id: int) -> tuple[str | None, str | None, object]:
    """(start, end, result) of a finished task, from either JSON format."""
    raw = wait_for_status(pueue, task_id, "Done")
    done = raw["status"]["Done"]
    if isinstance(done, dict) and "result" in done:  # v4: times inside the status
        return done["start"], done["end"], done["result"]
    return raw["start"], raw["end"], done


@pytest.mark.parametrize("fmt", ["v3", "v4"])
def test_a_crashed_daemons_restart_is_shown_as_pueue_shows_it(fake_pueue, fmt):
    """restore_state: the running task Done/Killed (v4: ended at the restore, v3: no end time),
    the group with a queued task paused, an idle group left running; the new daemon is a
    process called `pueued` whose pid is in its pid file, started at the restart."""
    fake_pueue.set_format(fmt)
    fake_pueue.add_group("idle", 1)
    running = add(fake_pueue, "sleep 60")
    queued = add(fake_pueue, "true")
    wait_for_status(fake_pueue, running, "Running")
    fake_pueue.stop_daemon(graceful=False)
    before_start = time.time()
    fake_pueue.start_daemon()

    start, end, result = _done(fake_pueue, running)
    pid = fake_pueue.store.daemon_pid()
    assert (fake_pueue.state_dir / "pueue.pid").read_text() == str(pid)
    assert Path(f"/proc/{pid}/comm").read_text().strip() == "pueued"
    daemon_start = _process_start(pid)
    assert before_start - 0.1 <= daemon_start <= time.time()
    assert result == "Killed" and start is not None
    if fmt == "v4":
        assert daemon_start - 0.1 <= parse_timestamp(end).timestamp() <= time.time()
    else:
        assert end is None
    groups = fake_pueue.status()["groups"]
    assert (groups["default"]["status"], groups["idle"]["status"]) == ("Paused", "Running")
    assert status_name(fake_pueue, queued) == "Queued"


def test_no_client_sees_the_state_from_before_the_restore(fake_pueue):
    """pueue opens its socket after restore_state: a status call during the restart fails to
    connect rather than show the task still running and its group not paused."""
    running = add(fake_pueue, "sleep 60")
    add(fake_pueue, "true")
    wait_for_status(fake_pueue, running, "Running")
    fake_pueue.stop_daemon(graceful=False)
    with open(fake_pueue.store.state_lock, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the new daemon's restore waits for this
        daemon = subprocess.Popen([str(fake_pueue.daemon_bin)], start_new_session=True)
        try:
            deadline = time.monotonic() + WAIT
            while not fake_pueue.store.daemon_running():
                assert time.monotonic() < deadline and daemon.poll() is None
                time.sleep(0.02)
            during = fake_pueue.run("status", "--json")
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    try:
        assert during.returncode == 1 and "Couldn't connect to the daemon" in during.stderr
        assert result_of(fake_pueue, running) == "Killed"
    finally:
        fake_pueue.stop_daemon()
        daemon.wait(timeout=WAIT)


def test_a_graceful_stop_kills_before_the_restart_and_the_restart_pauses(fake_pueue):
    """SIGTERM (a reboot, `pueue shutdown`): the daemon kills its tasks, recorded Killed with
    the time of the stop, starts nothing more; the next start pauses the waiting group."""
    running = add(fake_pueue, "sleep 60")
    queued = add(fake_pueue, "true")
    wait_for_status(fake_pueue, running, "Running")
    fake_pueue.stop_daemon(graceful=True)
    stopped = time.time()
    fake_pueue.start_daemon()

    _, end, result = _done(fake_pueue, running)
    assert result == "Killed" and parse_timestamp(end).timestamp() <= stopped
    assert parse_timestamp(end).timestamp() < _process_start(fake_pueue.store.daemon_pid())
    assert fake_pueue.status()["groups"]["default"]["status"] == "Paused"
    assert status_name(fake_pueue, queued) == "Queued"


# -- JSON formats ------------------------------------------------------------------------------------
def _variant(status) -> str:
    return status if isinstance(status, str) else next(iter(status))


def _shape(value):
    """Keys of a JSON value, recursively (the values themselves do not matter)."""
    if isinstance(value, dict):
        return {key: _shape(item) for key, item in value.items()}
    return type(value).__name__ if value is not None else "null"


def _tasks_in_every_status(pueue: FakePueue, tmp_path: Path) -> dict:
    pueue.add_group("test", 1)
    add(pueue, "ls", "-w", str(tmp_path))  # Done / Success
    failed = add(pueue, "ls /no/such/path", "-w", str(tmp_path))  # Done / Failed(2)
    result_of(pueue, failed)
    add(pueue, "ls", "-s")  # Stashed
    running = add(pueue, "sleep 60")
    queued = add(pueue, "true")
    wait_for_status(pueue, running, "Running")
    assert status_name(pueue, queued) == "Queued"
    return pueue.status()


def test_v4_status_has_the_shape_of_a_real_v4_state_file(fake_pueue, tmp_path):
    real = json.loads((SHARED_PUEUE / "v4.0.0_state.json").read_text())
    ours = _tasks_in_every_status(fake_pueue, tmp_path)

    def by_variant(state: dict) -> dict:
        shapes = {}
        for item in state["tasks"].values():
            shape = _shape({**item, "envs": {}, "label": None})
            key = _variant(item["status"])
            if key == "Done":
                key += ":" + _variant(item["status"]["Done"]["result"])
            shapes[key] = shape
        return shapes

    real_shapes, our_shapes = by_variant(real), by_variant(ours)
    assert set(real_shapes) <= set(our_shapes)
    for variant, shape in real_shapes.items():
        assert our_shapes[variant] == shape, variant
    assert {_shape(group) == _shape(real["groups"]["default"]) for group in ours["groups"].values()} == {True}
    assert list(next(iter(ours["tasks"].values()))) == V4_TASK_FIELDS


def test_v3_status_uses_the_v3_fields_and_forms(v3_pueue, tmp_path):
    state = _tasks_in_every_status(v3_pueue, tmp_path)
    tasks = list(state["tasks"].values())
    assert all(list(item) == V3_TASK_FIELDS for item in tasks)
    assert [item["status"] for item in tasks] == [
        {"Done": "Success"},
        {"Done": {"Failed": 2}},
        {"Stashed": {"enqueue_at": None}},
        "Running",
        "Queued",
    ]
    running = tasks[3]
    assert RFC3339.match(running["start"]) and running["end"] is None
    assert tasks[2]["enqueued_at"] is None and tasks[4]["start"] is None


def test_timestamps_follow_the_configured_offset_and_precision(fake_pueue):
    fake_pueue.pause_group("default")
    task_id = add(fake_pueue, "true")

    def created_at() -> str:
        return task(fake_pueue, task_id)["created_at"]

    assert re.fullmatch(r".*T\d\d:\d\d:\d\d\.\d{9}[+-]\d\d:\d\d", created_at())
    fake_pueue.configure(utc_offset_minutes=120, fraction_digits=3)
    assert re.fullmatch(r".*\.\d{3}\+02:00", created_at())
    fake_pueue.configure(utc_offset_minutes=0, fraction_digits=0, use_z=True)
    assert re.fullmatch(r".*T\d\d:\d\d:\d\dZ", created_at())
    fake_pueue.configure(utc_offset_minutes=-330, use_z=False)
    assert created_at().endswith("-05:30")


@pytest.mark.parametrize("fmt", ["v3", "v4"])
def test_version_mismatch_warning(fake_pueue, fmt):
    fake_pueue.configure(format=fmt, version_mismatch=True)
    result = fake_pueue.run("add", "-p", "--", "true")
    warning_stream, clean_stream = (result.stdout, result.stderr) if fmt == "v3" else (result.stderr, result.stdout)
    assert warning_stream.startswith("Different daemon version detected")
    assert result.stdout.splitlines()[-1] == "0" and clean_stream in ("", "0\n")
    status = fake_pueue.run("status", "--json")
    assert json.loads(status.stdout.splitlines()[-1])["tasks"]


# -- records for tests and benchmarks -------------------------------------------------------------
def test_every_client_call_is_recorded_but_the_fixtures_own(fake_pueue):
    fake_pueue.add_group("gpu0", 1)
    fake_pueue.status()
    fake_pueue.run("status", "--json")
    subprocess.run([str(fake_pueue.bin), "bogus"], capture_output=True)
    calls = fake_pueue.calls()
    assert [call["argv"] for call in calls] == [["--color", "never", "status", "--json"], ["bogus"]]
    assert all(call["time"] <= time.time() for call in calls)


def test_wrapper_works_through_ssh_without_environment(fake_pueue, sshd, tmp_path):
    command = f"{fake_pueue.bin} --color never add -p -l remote -w {tmp_path} -- 'echo via ssh'"
    ssh = ["ssh", *sshd.openssh_client_options(), "-p", str(sshd.port), f"{sshd.username}@{sshd.hostname}"]
    result = subprocess.run([*ssh, command], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    task_id = int(result.stdout)
    assert result_of(fake_pueue, task_id) == "Success" and task(fake_pueue, task_id)["label"] == "remote"


def test_client_starts_quickly(fake_pueue):
    durations = []
    for _ in range(5):
        started = time.perf_counter()
        fake_pueue.run("status", "--json")
        durations.append(time.perf_counter() - started)
    assert sorted(durations)[2] < 0.3  # median; pueue itself answers in a few ms
