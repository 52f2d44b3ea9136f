"""The fake `pueued`: a loop that starts queued tasks, reaps finished ones and records results.

Its process is called `pueued` as pueue's is (`ps -o comm`, /proc/PID/comm: the kernel names
a process started from a `#!` script after the script, here the `pueued` wrapper) and it writes
its pid file, so the evidence of its start that the production code reads on a real host (the
start of the `pueued` named in the pid file) is the same.

Tasks run as `sh -c "<command>"` in their own session (so a kill reaches the whole process
group), with only the task's stored environment plus PUEUE_GROUP and PUEUE_WORKER_ID, and
with stdout and stderr in one log file.
"""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import time

from .store import ACTIVE, FINISHED, StateDir, now_ns

LOOP_SECONDS = 0.2  # pueue's own task loop sleeps about this long
# pueue notices a killed task on a later loop; hold the news at least this long after the
# kill so that a poll right after `pueue kill` reliably still sees the task Running.
KILL_NOTICE_NS = 250_000_000


def run_daemon(state_dir: str) -> int:
    store = StateDir(state_dir)
    store.root.mkdir(parents=True, exist_ok=True)
    store.log_dir.mkdir(exist_ok=True)
    lock = open(store.daemon_lock, "a")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        sys.stderr.write(already_running_message())
        return 1
    store.pid_file.unlink(missing_ok=True)  # a crashed daemon's: no client is answered before the restore
    daemon = Daemon(store)
    signal.signal(signal.SIGTERM, daemon.request_stop)
    signal.signal(signal.SIGINT, daemon.request_stop)
    daemon.restore()
    store.write_pid_file(os.getpid())
    try:
        daemon.loop()
    finally:
        daemon.kill_children()
        store.pid_file.unlink(missing_ok=True)
    return 0


def already_running_message() -> str:
    return "Error: Pid file already exists and the daemon seems to be running.\nPlease stop the daemon beforehand.\n"


class Daemon:
    def __init__(self, store: StateDir):
        self.store = store
        self.children: dict[int, subprocess.Popen] = {}
        self.stopping = False

    def request_stop(self, signum, frame) -> None:
        self.stopping = True

    def loop(self) -> None:
        while not self.stopping:
            with self.store.transaction() as state:
                self.reap(state)
                self.finish_reset(state)
                self.fail_broken_dependencies(state)
                self.start_ready_tasks(state)
            time.sleep(LOOP_SECONDS)

    # -- restart -------------------------------------------------------------------------
    def restore(self) -> None:
        """What pueue's restore_state does with a saved state: a task still running or paused
        becomes Done/Killed (v4 gives it the restore time as its end; v3 leaves its end unset,
        which `restored_kill` keeps for the v3 rendering), and every group that still holds a
        queued task is paused; other groups keep their status."""
        with self.store.transaction() as state:
            for task in state["tasks"].values():
                if task["status"] in ACTIVE:
                    kill_leftover_process(task)
                    self.finish(task, "Killed")
                    task["restored_kill"] = True
            waiting_groups = {t["group"] for t in state["tasks"].values() if t["status"] == "Queued"}
            for name, group in state["groups"].items():
                if name in waiting_groups:
                    group["status"] = "Paused"
                elif group["status"] == "Reset":
                    group["status"] = "Running"

    def kill_children(self) -> None:
        for process in self.children.values():
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for process in self.children.values():
            process.wait()
        with self.store.transaction() as state:
            self.reap(state)

    # -- one loop ------------------------------------------------------------------------
    def reap(self, state: dict) -> None:
        for task_id, process in list(self.children.items()):
            code = process.poll()
            task = state["tasks"].get(str(task_id))
            if code is None or (task and now_ns() - (task.get("kill_requested") or 0) < KILL_NOTICE_NS):
                continue
            del self.children[task_id]
            if task is not None and task["pid"] == process.pid and task["status"] in ACTIVE:
                self.finish(task, result_of_exit(code))

    def finish(self, task: dict, result, *, started: bool = True) -> None:
        task["status"] = FINISHED
        task["result"] = result
        task["end"] = now_ns()
        if started:
            self.store.record_task_event("end", task, result=result)
        else:
            task["start"] = task["end"]

    def finish_reset(self, state: dict) -> None:
        groups = state["groups"].values()
        if not any(group["status"] == "Reset" for group in groups):
            return
        if any(task["status"] in ACTIVE for task in state["tasks"].values()):
            return  # killed tasks are reaped first
        for task_id in list(state["tasks"]):
            del state["tasks"][task_id]
            self.store.log_file(int(task_id)).unlink(missing_ok=True)
        for group in groups:
            group["status"] = "Running"

    def fail_broken_dependencies(self, state: dict) -> None:
        tasks = state["tasks"]
        for task in tasks.values():
            if task["status"] != "Queued":
                continue
            dependencies = [tasks.get(str(dep)) for dep in task["dependencies"]]
            if any(dep and dep["status"] == FINISHED and dep["result"] != "Success" for dep in dependencies):
                self.finish(task, "DependencyFailed", started=False)

    def start_ready_tasks(self, state: dict) -> None:
        tasks = state["tasks"]
        for name, group in state["groups"].items():
            if group["status"] == "Reset":
                continue
            running = [t for t in tasks.values() if t["group"] == name and t["status"] in ACTIVE]
            ready = sorted(
                (t for t in tasks.values() if t["group"] == name and t["status"] == "Queued" and dependencies_met(t, tasks)),
                key=lambda t: (-t["priority"], t["id"]),
            )
            for task in ready:
                limit = group["parallel_tasks"]
                has_room = group["status"] == "Running" and (limit == 0 or len(running) < limit)
                if task["immediate"] or has_room:
                    self.spawn(task, free_worker_id(running))
                    if task["status"] in ACTIVE:
                        running.append(task)

    def spawn(self, task: dict, worker_id: int) -> None:
        env = {**task["envs"], "PUEUE_GROUP": task["group"], "PUEUE_WORKER_ID": str(worker_id)}
        task["immediate"] = False
        try:
            with open(self.store.log_file(task["id"]), "wb") as log:
                process = subprocess.Popen(
                    ["sh", "-c", task["command"]],
                    cwd=task["path"],
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
        except OSError as error:
            message = f"Failed to spawn child {task['id']} with err: {error.strerror} (os error {error.errno})"
            self.finish(task, {"FailedToSpawn": message}, started=False)
            return
        self.children[task["id"]] = process
        task.update(
            status="Running",
            start=now_ns(),
            pid=process.pid,
            pid_started=process_start_time(process.pid),
            worker_id=worker_id,
        )
        self.store.record_task_event("start", task, worker_id=worker_id, pid=process.pid)


def result_of_exit(code: int):
    if code == 0:
        return "Success"
    if code < 0:
        return "Killed"  # Popen reports death by signal n as -n
    return {"Failed": code}


def dependencies_met(task: dict, tasks: dict) -> bool:
    for dep_id in task["dependencies"]:
        dep = tasks.get(str(dep_id))
        if dep is not None and not (dep["status"] == FINISHED and dep["result"] == "Success"):
            return False
    return True


def free_worker_id(running: list[dict]) -> int:
    taken = {task.get("worker_id") for task in running}
    return next(slot for slot in range(len(running) + 1) if slot not in taken)


def process_start_time(pid: int) -> str | None:
    """The kernel's start time of a process: tells a leftover task from a reused pid."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rpartition(")")[2].split()[19]
    except OSError:
        return None


def kill_leftover_process(task: dict) -> None:
    """A task of a daemon that died without cleaning up may still run: end it."""
    pid = task.get("pid")
    if pid and task.get("pid_started") and process_start_time(pid) == task["pid_started"]:
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
