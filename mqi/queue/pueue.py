"""The pueue client: drives the pueue daemon of one host through its command line.

Every call goes through the host's Transport as an argument list, with `--color never`
before the subcommand and a timeout. The pueue client runs under `env -i` so that the
environment `pueue add` stores in the task (and shows to anyone who runs `pueue status`)
holds only what we pass. A fixed `sh -c` wrapper keeps the few variables of the host's own
environment that say where pueue finds its config and socket (`$XDG_RUNTIME_DIR` decides the
socket path: without it the client looks in the wrong place), plus `HOME`, which the task
needs to behave like any other task of that user. Nothing we pass is ever parsed by that
shell: our values arrive as positional parameters.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime

from mqi.queue.base import (
    DaemonStart,
    GroupInfo,
    KillOutcome,
    Queue,
    QueueError,
    QueueSnapshot,
    SubmitRequest,
    TaskInfo,
    TaskState,
)
from mqi.queue.pueue_json import PueueOutputError, parse_groups, parse_log, parse_status
from mqi.transport.base import CommandResult, Transport, TransportError

log = logging.getLogger(__name__)

#: taken from the host's own environment, when set there; they locate pueue's files
HOST_LOCATION_VARIABLES = (
    "HOME",
    "XDG_RUNTIME_DIR",
    "XDG_CONFIG_HOME",
    "XDG_DATA_HOME",
    "PUEUE_CONFIG_PATH",
)
_MINIMAL_ENV_SCRIPT = (
    "exec env -i "
    + " ".join('${%s:+"%s=$%s"}' % (name, name, name) for name in HOST_LOCATION_VARIABLES)
    + ' "$@"'
)

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# the stored environment is readable by anyone who can run `pueue status` on the host
_SECRET_LOOKING_NAME = re.compile(r"PASSWORD|PASSWD|SECRET|TOKEN|CREDENTIAL|PRIVATE|API_?KEY", re.I)
_RESERVED_ENV_NAMES = {"PATH", *HOST_LOCATION_VARIABLES}
_UNKNOWN_GROUP = re.compile(r"Group .* doesn't exist")
_NOT_STARTED_STATES = {TaskState.QUEUED, TaskState.STASHED, TaskState.LOCKED}
_PUEUE_NOT_FOUND_CODES = {126, 127}

# When did the host's pueue daemon start? The pid file pueue writes at start names the daemon
# ($1 if configured, else pueue's default places: $XDG_RUNTIME_DIR/pueue.pid in v4, the pueue
# directory in v3 and without XDG_RUNTIME_DIR); it counts only if that process is alive, ours
# and called `pueued` (a stale file may name a reused pid). The kernel's start of the process
# (/proc/PID/stat field 22, in clock ticks after boot) against the uptime read on either side of
# the host's clock is exact to 10 ms on an idle host, unlike the file's mtime, `ps -o lstart` or
# /proc/stat's whole-second boot time. Prints "pid start-ticks ticks-per-second uptime host-now
# uptime"; exit 3: no running pueued found. Only shell builtins, plus getconf and date.
_DAEMON_START_SCRIPT = r"""
started() {
  [ -f "$1" ] || return 1
  read -r pid < "$1" || [ -n "$pid" ] || return 1
  case $pid in ''|*[!0-9]*) return 1;; esac
  [ -O "/proc/$pid" ] || return 1
  read -r name < "/proc/$pid/comm" || return 1
  [ "$name" = pueued ] || return 1
  read -r stat < "/proc/$pid/stat" || return 1
  set -- ${stat##*) }
  shift 19
  hz=$(getconf CLK_TCK)
  read -r up_before _ < /proc/uptime
  now=$(date +%s.%N)
  read -r up_after _ < /proc/uptime
  echo "$pid $1 $hz $up_before $now $up_after"
}
if [ -n "$1" ]; then started "$1" && exit 0; exit 3; fi
for file in ${XDG_RUNTIME_DIR:+"$XDG_RUNTIME_DIR/pueue.pid"} \
    "${XDG_DATA_HOME:-$HOME/.local/share}/pueue/pueue.pid"; do
  started "$file" && exit 0
done
exit 3
"""
_NO_DAEMON_FOUND = 3


class InvalidRequest(QueueError):
    """A submit request or group setting that pueue must not be given."""


class PueueCommandFailed(QueueError):
    """pueue refused a command or could not reach its daemon; `text` is what it printed."""

    def __init__(self, host: str, command: str, exit_code: int, text: str, hint: str = ""):
        self.host = host
        self.command = command
        self.exit_code = exit_code
        self.text = text
        detail = " ".join(text.split()) or "no output"  # one line, as MqiError promises
        super().__init__(
            f"host {host!r}: `pueue {command}` exited with {exit_code}: {detail}{hint}"
        )


class UnknownGroup(PueueCommandFailed):
    """The host's pueue daemon has no group of that name."""

    def __init__(self, host: str, group: str, exit_code: int, text: str):
        self.group = group
        super().__init__(
            host,
            "add",
            exit_code,
            text,
            f" (no pueue group {group!r} on this host: create it with "
            f"`pueue group add {group}` or fix the configured group)",
        )


class PueueQueue(Queue):
    """The pueue daemon of one host, reached through `transport`."""

    #: pause between status polls while confirming a kill
    kill_poll_interval = 0.25

    def __init__(
        self,
        transport: Transport,
        *,
        pueue: str = "pueue",
        path_env: str = "/usr/local/bin:/usr/bin:/bin",
        timeout: float = 30.0,
        pid_file: str | None = None,
    ):
        """`pid_file`: where the host's pueue daemon writes its pid (pueue.yml's `pid_path`),
        when it is not in one of pueue's default places."""
        if not pueue or "=" in pueue or pueue.startswith("-"):
            # `env` would read a name containing '=' as a variable assignment
            raise InvalidRequest(
                f"pueue program {pueue!r} must be a path without '=' not starting with '-'"
            )
        if "\0" in path_env:
            raise InvalidRequest("path_env must not contain NUL characters")
        self.transport = transport
        self.host = transport.host
        self.pueue = pueue
        self.path_env = path_env
        self.timeout = timeout
        self.pid_file = pid_file

    def __repr__(self) -> str:
        return f"PueueQueue(host={self.host!r}, pueue={self.pueue!r})"

    # --- the Queue interface ---

    def submit(self, request: SubmitRequest, *, adopt: bool = True) -> int:
        _check_request(request)
        existing = self.snapshot().find(None, request.label) if adopt else None
        if existing is not None:
            log.info("host %s: adopting task %d of %s", self.host, existing.id, request.label)
            return existing.id
        result = self._pueue(
            [
                "add",
                "--print-task-id",
                f"--group={request.group}",
                f"--label={request.label}",
                f"--working-directory={request.workdir}",
                "--",
                request.command,  # one argument: the daemon runs it with `sh -c`
            ],
            env=request.env,
        )
        if result.exit_code != 0:
            text = _printed(result)
            if _UNKNOWN_GROUP.search(text):
                raise UnknownGroup(self.host, request.group, result.exit_code, text)
            raise self._failure("add", result)
        return self._task_id(result)

    def snapshot(self) -> QueueSnapshot:
        return self._status()

    def kill(self, task_id: int, label: str, *, confirm_timeout: float = 10.0) -> KillOutcome:
        """Kill (running) or remove (not started) our task, then poll until it is over."""
        deadline = time.monotonic() + confirm_timeout
        seen: TaskInfo | None = None
        sent: list[str] = []
        try:
            while True:
                timeout = self._call_timeout(deadline)
                seen = self._status(timeout).find(task_id, label)
                if seen is None:
                    return KillOutcome(True, None, f"task {task_id} ({label}) is not on the host")
                if seen.finished:
                    return KillOutcome(True, seen, f"task {seen.id} ({label}) is {seen.result}")
                # a queued task cannot be killed, and must not start later: remove it
                action = "remove" if seen.state in _NOT_STARTED_STATES else "kill"
                if action not in sent:
                    sent.append(action)
                    # exit 1 means the task changed state meanwhile; the next poll decides
                    self._pueue([action, str(seen.id)], timeout=timeout)
                if time.monotonic() >= deadline:
                    return KillOutcome(
                        False,
                        seen,
                        f"task {seen.id} ({label}) is still {seen.state} "
                        f"{confirm_timeout:g} s after `pueue {' then '.join(sent)}`",
                    )
                time.sleep(self.kill_poll_interval)
        except (TransportError, QueueError) as error:
            return KillOutcome(False, seen, f"could not confirm the end of task {task_id}: {error}")

    def log_tails(self, tasks: Mapping[int, str], lines: int = 15) -> dict[int, str]:
        if lines < 1:
            raise InvalidRequest(f"log lines must be at least 1, not {lines}")
        if not tasks:
            return {}
        result = self._checked(["log", *map(str, sorted(tasks)), "--json", "--lines", str(lines)])
        entries = parse_log(result.out, self.host)
        return {task_id: _our_output(entries.get(task_id), label) for task_id, label in tasks.items()}

    def daemon_start(self) -> DaemonStart | None:
        """The start of the host's `pueued`, from its pid file and the kernel; None if no
        running daemon of ours is found there. Raises TransportError when the host is away."""
        asked = datetime.now(UTC)
        result = self.transport.run(
            ["sh", "-c", _DAEMON_START_SCRIPT, "mqi-pueued-start", self.pid_file or ""],
            timeout=self.timeout,
        )
        answered = datetime.now(UTC)
        if result.exit_code == _NO_DAEMON_FOUND:
            log.info("host %s: no running pueued found by its pid file %s", self.host,
                     self.pid_file or "in pueue's default places")
            return None
        try:
            _pid, ticks, hz, up_before, now, up_after = result.check().out.split()
            seconds, _, fraction = now.partition(".")  # busybox's date has no %N
            host_now = int(seconds) + (float(f"0.{fraction}") if fraction.isdigit() else 0.0)
            uptime = (float(up_before) + float(up_after)) / 2  # when `date` ran, on a busy host too
            started = host_now - (uptime - int(ticks) / int(hz))
        except ValueError:
            raise QueueError(f"host {self.host!r}: cannot read the start of its pueue daemon: "
                             f"unexpected answer {result.out.strip()[:100]!r}") from None
        return DaemonStart(
            started_at=datetime.fromtimestamp(started, UTC),
            host_now=datetime.fromtimestamp(host_now, UTC),
            asked_at=asked,
            answered_at=answered,
        )

    def start_group(self, group: str) -> None:
        """`pueue start --group G`: the group runs its queued tasks again."""
        _check_group(group, 0)
        self._checked(["start", "--group", group])

    # --- setup ---

    def groups(self) -> dict[str, GroupInfo]:
        return parse_groups(self._checked(["group", "--json"]).out, self.host)

    def ensure_groups(self, groups: Mapping[str, int]) -> dict[str, str]:
        """Add missing groups and set their parallel task count; never start a paused group.

        Returns what was done or needs a person, by group: 'added', 'parallel 1 -> 2',
        'paused' (a paused group may be paused on purpose, so it is only reported)."""
        for name, parallel in groups.items():
            _check_group(name, parallel)
        current = self.groups()
        report: dict[str, str] = {}
        for name, parallel in groups.items():
            group = current.get(name)
            if group is None:
                self._checked(["group", "add", name, "--parallel", str(parallel)])
                report[name] = "added"
                continue
            notes = []
            if group.parallel != parallel:
                self._checked(["parallel", str(parallel), "--group", name])
                notes.append(f"parallel {group.parallel} -> {parallel}")
            if group.paused:
                notes.append("paused")
            if notes:
                report[name] = ", ".join(notes)
        return report

    # --- running pueue ---

    def _pueue(
        self,
        args: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        timeout: float | None = None,
    ) -> CommandResult:
        assignments = [f"{name}={value}" for name, value in (env or {}).items()]
        argv = [
            "sh",
            "-c",
            _MINIMAL_ENV_SCRIPT,
            "mqi-pueue",  # $0 of the wrapper
            f"PATH={self.path_env}",
            *assignments,
            self.pueue,
            "--color",
            "never",
            *args,
        ]
        return self.transport.run(argv, timeout=timeout or self.timeout)

    def _status(self, timeout: float | None = None) -> QueueSnapshot:
        return parse_status(self._checked(["status", "--json"], timeout=timeout).out, self.host)

    def _checked(self, args: Sequence[str], *, timeout: float | None = None) -> CommandResult:
        result = self._pueue(args, timeout=timeout)
        if result.exit_code != 0:
            raise self._failure(args[0], result)
        return result

    def _failure(self, command: str, result: CommandResult) -> PueueCommandFailed:
        hint = ""
        if result.exit_code in _PUEUE_NOT_FOUND_CODES:
            hint = f" (is {self.pueue!r} the right path of pueue on this host?)"
        return PueueCommandFailed(self.host, command, result.exit_code, _printed(result), hint)

    def _task_id(self, result: CommandResult) -> int:
        # an older client may print a version warning line before the id
        lines = [line.strip() for line in result.out.splitlines() if line.strip()]
        if lines and lines[-1].isdigit():
            return int(lines[-1])
        found = repr(lines[-1][:200]) if lines else "nothing"
        raise PueueOutputError(
            self.host, "add --print-task-id", f"expected a task id, found {found}"
        )

    def _call_timeout(self, deadline: float) -> float:
        # at least a second, so that a short confirm_timeout still allows one status call
        return max(1.0, min(self.timeout, deadline - time.monotonic()))


def _printed(result: CommandResult) -> str:
    # v3 prints its failures to stdout, v4 to stderr
    return " / ".join(part for part in (result.out.strip(), result.err.strip()) if part)


def _check_request(request: SubmitRequest) -> None:
    problems = []
    for what, value in (("label", request.label), ("group", request.group)):
        if not value or any(c in value for c in "\0\n\r"):
            problems.append(f"{what} {value!r} must be one non-empty line")
    if not request.workdir.startswith("/") or "\0" in request.workdir:
        problems.append(f"working directory {request.workdir!r} must be an absolute path")
    if not request.command.strip() or "\0" in request.command:
        problems.append("command must be a non-empty shell command line")
    problems.extend(_env_problems(request.env))
    if problems:
        raise InvalidRequest(f"cannot submit {request.label!r}: " + "; ".join(problems))


def _env_problems(env: Mapping[str, str]) -> list[str]:
    problems = []
    for name, value in env.items():
        if not isinstance(name, str) or not _ENV_NAME.fullmatch(name):
            problems.append(f"environment name {name!r} is not a valid identifier")
        elif name in _RESERVED_ENV_NAMES or name.startswith("PUEUE_"):
            problems.append(f"environment variable {name} is set by the pueue client itself")
        elif _SECRET_LOOKING_NAME.search(name):
            problems.append(
                f"environment variable {name} looks like a secret; pueue shows task "
                "environments to every user of `pueue status`"
            )
        elif not isinstance(value, str) or "\0" in value:
            problems.append(f"environment variable {name} must be a string without NUL")
    return problems


def _check_group(name: str, parallel: int) -> None:
    if not name or name.startswith("-") or any(c.isspace() or c == "\0" for c in name):
        raise InvalidRequest(f"group name {name!r} must be one word not starting with '-'")
    if isinstance(parallel, bool) or not isinstance(parallel, int) or parallel < 0:
        raise InvalidRequest(f"group {name!r}: parallel must be a whole number >= 0")


def _our_output(entry, label: str) -> str:
    if entry is None or entry.task.label != label:
        return ""  # gone, or the id now belongs to another task
    if entry.output.startswith("(Pueue error)"):
        return ""  # not started yet: no log file
    return entry.output
