"""A task queue on this machine without pueue: the embedded default for one GPU workstation.

There is no daemon. The state lives in files under `root`, one folder per task, and every
change happens under an fcntl lock on `root/lock`, so several processes may share a queue
and the orchestrator may restart at any time. Queued tasks are started (in id order, while
their group has a free slot) whenever somebody calls `submit()` or `snapshot()`.

A task folder holds:
- `task.json`        the request (id, label, group, command, workdir, env) and its times
- `start.json`       written when the task is started; from then on it counts as running
- `supervisor.json`  identity (pid, start time, boot id) of the process that watches it
- `command.json`     identity of `sh -c COMMAND`, the leader of the task's process group
- `kill.json`        a kill was asked for
- `exit.json`        the result, written atomically (temp file + rename) by whoever saw the end
- `output.log`       the command's stdout and stderr
- `launcher.log`     output of the launcher and supervisor themselves (tracebacks)

Each started task runs as: launcher (`python -m mqi.queue.local FOLDER`, in a new session)
-> forks the supervisor and exits -> the supervisor runs `/bin/sh -c COMMAND` in the workdir,
in a process group of its own, waits for it and writes `exit.json`. The supervisor does not
belong to our process tree, so the result is recorded even when the orchestrator is dead.
A kill is SIGKILL to the command's process group, like `pueue kill`; the supervisor survives
it and records the task as killed.

A task whose supervisor and command are gone without an `exit.json` (the machine rebooted,
or someone killed the supervisor) is recorded as ERRORED ("ended without a recorded exit"),
or as KILLED when a kill had been asked for. We do not call it KILLED the way pueue does
after a daemon restart: nobody killed it on purpose, and the caller must look for results.

There is no daemon whose restart ends tasks (each task has its own supervisor, which outlives
the orchestrator) and groups are never paused, so the restart evidence of the Queue interface
does not apply: `daemon_start()` is None, and a reboot of this machine, which also ends the
orchestrator, leaves its tasks ERRORED as above.

Only Linux is supported: process identities are read from /proc.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from functools import cache
from pathlib import Path
from typing import Any

from mqi.errors import ConfigError
from mqi.queue.base import (
    GroupInfo,
    KillOutcome,
    Queue,
    QueueError,
    QueueSnapshot,
    SubmitRequest,
    TaskInfo,
    TaskResult,
    TaskState,
)

TASK_FILE = "task.json"
START_FILE = "start.json"
SUPERVISOR_FILE = "supervisor.json"
COMMAND_FILE = "command.json"
KILL_FILE = "kill.json"
EXIT_FILE = "exit.json"
OUTPUT_FILE = "output.log"
LAUNCHER_LOG = "launcher.log"

# The only variables of our own environment a task gets; everything else comes from the request.
BASE_ENV_VARS = ("PATH", "HOME")
DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"
LAUNCH_TIMEOUT_SECONDS = 60.0
KILL_POLL_SECONDS = 0.05
# Where the `mqi` package lives, so the launcher imports this same code.
PACKAGE_PARENT = str(Path(__file__).resolve().parents[2])


def _now() -> datetime:
    return datetime.now(UTC)


def _parse_time(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value else None


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Write `data` so that readers see the old file or the whole new one, never a part."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(temporary, "w", encoding="utf-8") as handle:
            json.dump(data, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None


# --- process identities -------------------------------------------------------------------


@cache
def _boot_id() -> str:
    return Path("/proc/sys/kernel/random/boot_id").read_text().strip()


def _proc_stat(pid: int) -> tuple[str, int, int] | None:
    """(state, process group, start time in clock ticks since boot) of a process, or None."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name (field 2) may contain spaces and parentheses: split after the last ')'.
    fields = text[text.rindex(")") + 2 :].split()
    return fields[0], int(fields[2]), int(fields[19])


@dataclass(frozen=True)
class ProcessIdentity:
    """A process named so that a later process with the same pid is not mistaken for it."""

    pid: int
    start_ticks: int
    boot_id: str

    @classmethod
    def of(cls, pid: int) -> ProcessIdentity | None:
        stat = _proc_stat(pid)
        return None if stat is None else cls(pid, stat[2], _boot_id())

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> ProcessIdentity | None:
        return None if data is None else cls(data["pid"], data["start_ticks"], data["boot_id"])

    def is_alive(self) -> bool:
        stat = _proc_stat(self.pid)
        return (
            stat is not None
            and stat[0] not in ("Z", "X")  # a zombie has ended; only its parent did not reap it
            and stat[2] == self.start_ticks
            and self.boot_id == _boot_id()
        )


def live_group_members(pgid: int) -> list[int]:
    """Pids of the processes of a process group that have not ended."""
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            stat = _proc_stat(int(entry.name))
            if stat is not None and stat[1] == pgid and stat[0] not in ("Z", "X"):
                members.append(int(entry.name))
    return members


# --- the launcher and supervisor (run as `python -m mqi.queue.local TASK_FOLDER`) -----------


def _launch_supervisor(folder: Path) -> None:
    """Fork the supervisor, record who it is, and return so the launcher can exit."""
    pid = os.fork()
    if pid == 0:
        try:
            _supervise(folder)
        finally:
            os._exit(0)
    identity = ProcessIdentity.of(pid)  # our unreaped child: its pid cannot be reused yet
    write_json_atomic(folder / SUPERVISOR_FILE, asdict(identity))


def _supervise(folder: Path) -> None:
    task = _read_json(folder / TASK_FILE)
    if (folder / KILL_FILE).exists():
        _record(folder, TaskResult.KILLED, reason="killed before the command started")
        return
    # Our own environment is the minimal base the orchestrator gave the launcher.
    env = {name: os.environ[name] for name in BASE_ENV_VARS if name in os.environ}
    env.update(task["env"])
    try:
        with open(folder / OUTPUT_FILE, "ab") as output:
            command = subprocess.Popen(
                ["/bin/sh", "-c", task["command"]],
                cwd=task["workdir"],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                process_group=0,
            )
    except OSError as error:
        message = f"cannot start the command in {task['workdir']}: {error.strerror or error}"
        _record(folder, TaskResult.FAILED_TO_SPAWN, spawn_error=message)
        return
    write_json_atomic(folder / COMMAND_FILE, asdict(ProcessIdentity.of(command.pid)))
    returncode = command.wait()
    if returncode < 0:
        _record(folder, TaskResult.KILLED, signal=-returncode)
    elif returncode == 0:
        _record(folder, TaskResult.SUCCESS, exit_code=0)
    else:
        _record(folder, TaskResult.FAILED, exit_code=returncode)


def _record(folder: Path, result: TaskResult, **details: Any) -> None:
    write_json_atomic(folder / EXIT_FILE, {"result": result.value, "end": _now().isoformat(), **details})


# --- the queue ------------------------------------------------------------------------------


class LocalQueue(Queue):
    """Tasks run on this machine; `groups` maps group name to its number of slots."""

    def __init__(self, root: Path, groups: dict[str, int], host: str = "local"):
        problems = [
            f"local queue group {name!r}: slots must be at least 1, got {slots}"
            for name, slots in groups.items()
            if slots < 1
        ]
        if problems:
            raise ConfigError(problems)
        self.root = Path(root).resolve()  # the detached launcher runs in another folder
        self.groups = dict(groups)
        self.host = host
        self._tasks_dir = self.root / "tasks"
        self._tasks_dir.mkdir(parents=True, exist_ok=True)

    def __repr__(self) -> str:
        return f"LocalQueue(root={str(self.root)!r}, groups={self.groups!r}, host={self.host!r})"

    # --- Queue interface

    def submit(self, request: SubmitRequest, *, adopt: bool = True) -> int:
        with self._locked():
            if request.group not in self.groups:
                raise QueueError(
                    f"group {request.group!r} does not exist on {self.host}; "
                    f"use one of these: {sorted(self.groups)}"
                )
            tasks = self._refresh_all()
            same_label = [t.id for t in tasks.values() if t.label == request.label]
            if same_label and adopt:
                return max(same_label)
            task_id = self._create(request)
            self._start_queued(self._refresh_all())
            return task_id

    def snapshot(self) -> QueueSnapshot:
        with self._locked():
            tasks = self._refresh_all()
            if self._start_queued(tasks):
                tasks = self._refresh_all()
        groups = {name: GroupInfo(name, paused=False, parallel=n) for name, n in self.groups.items()}
        return QueueSnapshot(tasks=tasks, groups=groups)

    def kill(self, task_id: int, label: str, *, confirm_timeout: float = 10.0) -> KillOutcome:
        folder = self._folder_of(task_id, label)
        if folder is None:
            return KillOutcome(True, None, f"no task {task_id} with label {label!r} on {self.host}")
        with self._locked():
            task = self._refresh(folder)
            if task.state is TaskState.QUEUED:
                _record(folder, TaskResult.KILLED, reason="removed before it started")
                return KillOutcome(True, self._refresh(folder), "removed from the queue before it started")
            if task.finished:
                return KillOutcome(True, task, "the task had already finished")
            write_json_atomic(folder / KILL_FILE, {"requested_at": _now().isoformat()})
        return self._kill_until_gone(folder, confirm_timeout)

    def log_tails(self, tasks: Mapping[int, str], lines: int = 15) -> dict[int, str]:
        """The last lines of each output; '' for a task with none yet or not known."""
        tails = {}
        for task_id, label in tasks.items():
            folder = self._folder_of(task_id, label)
            tails[task_id] = "" if folder is None else _tail(folder / OUTPUT_FILE, lines)
        return tails

    # --- task folders

    @contextmanager
    def _locked(self) -> Iterator[None]:
        # flock (not lockf) so that two queue objects in one process also exclude each other.
        with open(self.root / "lock", "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            yield

    def _folders(self) -> list[Path]:
        """Task folders in id order; a folder left without task.json by a crash is skipped."""
        folders = [p for p in self._tasks_dir.iterdir() if p.name.isdigit() and (p / TASK_FILE).exists()]
        return sorted(folders, key=lambda p: int(p.name))

    def _folder_of(self, task_id: int, label: str) -> Path | None:
        folder = self._tasks_dir / str(task_id)
        task = _read_json(folder / TASK_FILE)
        return folder if task is not None and task["label"] == label else None

    def _create(self, request: SubmitRequest) -> int:
        existing = [int(p.name) for p in self._tasks_dir.iterdir() if p.name.isdigit()]
        task_id = max(existing, default=-1) + 1
        folder = self._tasks_dir / str(task_id)
        folder.mkdir()
        created = _now().isoformat()
        write_json_atomic(
            folder / TASK_FILE,
            {
                "id": task_id,
                "label": request.label,
                "group": request.group,
                "command": request.command,
                # Like the pueue client: a relative workdir is taken from the caller's cwd.
                "workdir": os.path.abspath(request.workdir),
                "env": dict(request.env),
                "created_at": created,
                "enqueued_at": created,
            },
        )
        return task_id

    def _refresh_all(self) -> dict[int, TaskInfo]:
        return {task.id: task for task in map(self._refresh, self._folders())}

    def _refresh(self, folder: Path) -> TaskInfo:
        """The task as its files say, first recording the end of one whose processes vanished."""
        if (folder / START_FILE).exists() and not (folder / EXIT_FILE).exists():
            if not self._is_alive(folder) and not (folder / EXIT_FILE).exists():
                # Re-checked: the supervisor writes exit.json just before it exits.
                killed = (folder / KILL_FILE).exists()
                _record(
                    folder,
                    TaskResult.KILLED if killed else TaskResult.ERRORED,
                    reason="the task's processes vanished without recording an exit",
                )
        return _task_info(folder)

    @staticmethod
    def _is_alive(folder: Path) -> bool:
        identities = (
            ProcessIdentity.from_json(_read_json(folder / name)) for name in (SUPERVISOR_FILE, COMMAND_FILE)
        )
        return any(identity is not None and identity.is_alive() for identity in identities)

    # --- scheduling

    def _start_queued(self, tasks: dict[int, TaskInfo]) -> bool:
        """Start queued tasks, in id order, while their group has a free slot."""
        running = {name: 0 for name in self.groups}
        for task in tasks.values():
            if task.state is TaskState.RUNNING and task.group in running:
                running[task.group] += 1
        started = False
        for task in sorted(tasks.values(), key=lambda t: t.id):
            if task.state is TaskState.QUEUED and running.get(task.group, 0) < self.groups.get(task.group, 0):
                self._launch(self._tasks_dir / str(task.id))
                running[task.group] += 1
                started = True
        return started

    def _launch(self, folder: Path) -> None:
        write_json_atomic(folder / START_FILE, {"start": _now().isoformat()})
        env = {name: os.environ.get(name, "") for name in BASE_ENV_VARS}
        env["PATH"] = env["PATH"] or DEFAULT_PATH
        launcher_env = {**env, "PYTHONPATH": PACKAGE_PARENT}
        with open(folder / LAUNCHER_LOG, "ab") as log:
            try:
                launcher = subprocess.run(
                    [sys.executable, "-m", "mqi.queue.local", str(folder)],
                    cwd=folder,
                    env=launcher_env,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    timeout=LAUNCH_TIMEOUT_SECONDS,
                )
                failure = None if launcher.returncode == 0 else f"exit code {launcher.returncode}"
            except (OSError, subprocess.TimeoutExpired) as error:
                failure = str(error)
        if failure is not None and not (folder / EXIT_FILE).exists():
            message = f"the local queue's launcher failed ({failure}); see {folder / LAUNCHER_LOG}"
            _record(folder, TaskResult.FAILED_TO_SPAWN, spawn_error=message)

    # --- killing

    def _kill_until_gone(self, folder: Path, confirm_timeout: float) -> KillOutcome:
        """SIGKILL the process group until the end is recorded and no process of it is left."""
        deadline = time.monotonic() + confirm_timeout
        while True:
            with self._locked():
                task = self._refresh(folder)
                leader = ProcessIdentity.from_json(_read_json(folder / COMMAND_FILE))
                left = live_group_members(leader.pid) if leader is not None else []
                # Safe from pid reuse: an unfinished task has a live supervisor or leader (checked
                # by _refresh), and a group id is never handed out again while the group has members.
                if leader is not None and (left or not task.finished):
                    _kill_group(leader.pid)
            if task.finished and not left:
                how = "killed" if task.result is TaskResult.KILLED else f"ended with result {task.result}"
                return KillOutcome(True, task, how)
            if time.monotonic() >= deadline:
                return KillOutcome(
                    False, task, f"task {task.id} was still running {confirm_timeout:g}s after SIGKILL"
                )
            time.sleep(KILL_POLL_SECONDS)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass  # the group ended since we looked


def _task_info(folder: Path) -> TaskInfo:
    task = _read_json(folder / TASK_FILE)
    start = _read_json(folder / START_FILE)
    end = _read_json(folder / EXIT_FILE)
    if end is not None:
        state = TaskState.DONE
    elif start is not None:
        state = TaskState.RUNNING
    else:
        state = TaskState.QUEUED
    end = end or {}
    return TaskInfo(
        id=task["id"],
        label=task["label"],
        group=task["group"],
        state=state,
        result=TaskResult(end["result"]) if "result" in end else None,
        exit_code=end.get("exit_code"),
        spawn_error=end.get("spawn_error"),
        command=task["command"],
        path=task["workdir"],
        created_at=_parse_time(task["created_at"]),
        enqueued_at=_parse_time(task["enqueued_at"]),
        start=_parse_time(start["start"]) if start else None,
        end=_parse_time(end.get("end")),
    )


def _tail(path: Path, lines: int, block_size: int = 8192) -> str:
    """The last `lines` lines of a file, read from its end (logs can be large)."""
    try:
        handle = open(path, "rb")
    except FileNotFoundError:
        return ""
    with handle:
        position = handle.seek(0, os.SEEK_END)
        data = b""
        while position > 0 and data.count(b"\n") <= lines:
            step = min(block_size, position)
            position -= step
            handle.seek(position)
            data = handle.read(step) + data
    text = data.decode("utf-8", errors="replace")
    return "\n".join(text.splitlines()[-lines:]) if lines > 0 else ""


if __name__ == "__main__":
    _launch_supervisor(Path(sys.argv[1]))
