"""The fake `pueue` client: each subcommand reads or changes the shared state directly.

Answers follow pueue's wording (INTERFACE.md and pueue's message handlers). Failures go to
stdout in v3 and to stderr in v4, with exit code 1. Killing, pausing and resuming signal the
task's process group right away; the daemon records the outcome on its next loop.
"""

from __future__ import annotations

import json
import os
import signal
import sys

from .cli import UsageError, parse_client_args, print_usage_error
from .render import render_groups, render_state, render_task
from .store import ACTIVE, FINISHED, StateDir, now_ns

VERSIONS = {"v3": "3.4.1", "v4": "4.0.4"}
MISMATCHED_DAEMON_VERSIONS = {"v3": "3.4.0", "v4": "4.0.3"}
DEFAULT_GROUP = "default"
DEFAULT_LOG_LINES = 15


class Failure(Exception):
    """The daemon refused the request; the text is what pueue prints."""


def main(state_dir: str, argv: list[str]) -> int:
    store = StateDir(state_dir)
    if store.root.is_dir():
        store.record_call(argv)
    try:
        path, options = parse_client_args(argv)
    except UsageError as error:
        return print_usage_error(error)
    settings = store.settings()
    if path == ["version"]:
        print(f"pueue {VERSIONS[settings['format']]}")
        return 0
    if not store.daemon_accepting():
        sys.stderr.write(
            "Error: Failed to initialize stream.\n\nCaused by:\n"
            f"    0: Couldn't connect to the daemon (state in {store.root}). Did you start it?\n"
        )
        return 1
    client = Client(store, settings)
    client.warn_about_version(path, options)
    try:
        text = HANDLERS[tuple(path)](client, options)
    except UsageError as error:
        return print_usage_error(error)
    except Failure as failure:
        stream = sys.stdout if settings["format"] == "v3" else sys.stderr
        stream.write(f"{failure}\n")
        return 1
    if text is not None:
        sys.stdout.write(text + "\n")
    return 0


class Client:
    def __init__(self, store: StateDir, settings: dict):
        self.store = store
        self.settings = settings

    def warn_about_version(self, path: list[str], options: dict) -> None:
        if not self.settings["version_mismatch"]:
            return
        fmt = self.settings["format"]
        warning = (
            f"Different daemon version detected '{MISMATCHED_DAEMON_VERSIONS[fmt]}'. "
            "Consider restarting the daemon.\n"
        )
        if fmt == "v3":
            sys.stdout.write(warning)  # v3 printed it with println!, even before JSON
        elif not options.get("json"):
            sys.stderr.write(warning)  # v4 logs it, and stays quiet for JSON output

    def dumps(self, value) -> str:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


# -- helpers ----------------------------------------------------------------------------
def ensure_group(state: dict, name: str) -> dict:
    if name not in state["groups"]:
        names = ", ".join(f'"{group}"' for group in sorted(state["groups"]))
        raise Failure(f"Group {name} doesn't exists. Use one of these: [{names}]")
    return state["groups"][name]


def task_response(message: str, matching: list[int], failing: list[int]) -> str:
    """pueue's answer for actions on listed ids: some may succeed, some may not."""
    done = f"{message}: {', '.join(map(str, matching))}"
    failed = f"The command failed for tasks: {', '.join(map(str, failing))}"
    if not failing:
        return done
    if not matching:
        raise Failure(failed)
    return f"{done}\n{failed}"


def split_ids(state: dict, ids: list[int], accept) -> tuple[list[int], list[int]]:
    matching, failing = [], []
    for task_id in ids:
        task = state["tasks"].get(str(task_id))
        (matching if task is not None and accept(task) else failing).append(task_id)
    return matching, failing


def signal_task(task: dict, signum: int) -> None:
    try:
        os.killpg(task["pid"], signum)
    except (ProcessLookupError, PermissionError):
        pass  # ended already; the daemon reaps it on its next loop


def kill_task(task: dict) -> None:
    signal_task(task, signal.SIGKILL)
    task["kill_requested"] = now_ns()  # the daemon reports the death a little later


def set_paused(task: dict, paused: bool) -> None:
    signal_task(task, signal.SIGSTOP if paused else signal.SIGCONT)
    task["status"] = "Paused" if paused else "Running"


def removable(state: dict, task_id: int, also_removed: list[int]) -> bool:
    """A task others still wait for stays, unless those others go too."""
    return not any(
        task_id in other["dependencies"] and other["status"] != FINISHED and other["id"] not in also_removed
        for other in state["tasks"].values()
    )


def drop_task(store: StateDir, state: dict, task_id: int) -> None:
    del state["tasks"][str(task_id)]
    store.log_file(task_id).unlink(missing_ok=True)


def selected_groups(state: dict, options: dict) -> list[str]:
    if options.get("all"):
        return sorted(state["groups"])
    name = options.get("group") or DEFAULT_GROUP
    ensure_group(state, name)
    return [name]


# -- subcommands ------------------------------------------------------------------------
def add(client: Client, options: dict) -> str:
    command = " ".join(_escaped(options["command"]) if options["escape"] else options["command"])
    path = _working_directory(client, options["working_directory"])
    with client.store.transaction() as state:
        group_name = options["group"] or DEFAULT_GROUP
        group = ensure_group(state, group_name)
        missing = [dep for dep in options["after"] if str(dep) not in state["tasks"]]
        if missing:
            raise Failure(f"Unable to setup dependencies : task(s) {missing} not found")
        task_id = max(map(int, state["tasks"]), default=-1) + 1
        stashed = options["stashed"]
        created = now_ns()
        state["tasks"][str(task_id)] = {
            "id": task_id,
            "created_at": created,
            "enqueued_at": None if stashed else created,
            "original_command": command,
            "command": command,
            "path": path,
            "envs": caller_environment(),
            "group": group_name,
            "dependencies": sorted(set(options["after"])),
            "priority": options["priority"] or 0,
            "label": options["label"],
            "status": "Stashed" if stashed else "Queued",
            "created_status": "Stashed" if stashed else "Queued",
            "result": None,
            "start": None,
            "end": None,
            "pid": None,
            "immediate": options["immediate"],
        }
    if options["print_task_id"]:
        return str(task_id)
    text = f"New task added (id {task_id})."
    if group["status"] == "Paused":
        text += "\nThe group of this task is currently paused!"
    return text


def caller_environment() -> dict:
    env = dict(os.environ)
    # Python started in the C locale adds LC_CTYPE=C.UTF-8 (PEP 538): not the caller's.
    if sys.flags.utf8_mode and not env.get("LC_ALL"):
        env.pop("LC_CTYPE", None)
    return env


def _escaped(words: list[str]) -> list[str]:
    import shlex  # only `add --escape` needs it; keep the common call fast

    return [shlex.quote(word) for word in words]


def _working_directory(client: Client, given: str | None) -> str:
    if given is None:
        return os.getcwd()
    path = os.path.abspath(given)
    # 4.0.3+ refuses a missing directory; v3 accepts it and the task fails to spawn later.
    if client.settings["format"] == "v4" and not os.path.isdir(path):
        raise Failure(f"Error: Failed to find working directory: {path}")
    return path


def status(client: Client, options: dict) -> str:
    state = client.store.read()
    if options["json"]:
        return client.dumps(render_state(state, client.settings, options["group"]))
    lines = [f"{'Id':>4}  {'Status':<24} {'Label':<20} Command"]
    for key, task in sorted(state["tasks"].items(), key=lambda item: int(item[0])):
        if options["group"] in (None, task["group"]):
            shown = task["status"] if task["status"] != FINISHED else _result_word(task["result"])
            lines.append(f"{task['id']:>4}  {shown:<24} {task['label'] or '':<20} {task['command']}")
    return "\n".join(lines)


def _result_word(result) -> str:
    return result if isinstance(result, str) else next(iter(result))


def log(client: Client, options: dict) -> str:
    if options["lines"] is not None and options["full"]:
        raise UsageError("the argument '--lines <LINES>' cannot be used with '--full'")
    state = client.store.read()
    ids = sorted(set(options["task_ids"])) or sorted(map(int, state["tasks"]))
    lines = None if options["full"] else options["lines"] or (DEFAULT_LOG_LINES if options["json"] else None)
    entries = {}
    for task_id in ids:
        task = state["tasks"].get(str(task_id))
        if task is not None:
            entries[str(task_id)] = {
                "task": render_task(task, client.settings, with_envs=False),
                "output": _read_log(client.store, task_id, lines),
            }
    if options["json"]:
        return client.dumps(entries)
    return "\n".join(f"--- Task {key}:\n{entry['output']}" for key, entry in entries.items())


def _read_log(store: StateDir, task_id: int, lines: int | None) -> str:
    path = store.log_file(task_id)
    try:
        text = path.read_bytes().decode(errors="replace")
    except OSError as error:
        return (
            f'(Pueue error) Failed to get log file handle: I/O error at path "{path}" while '
            f"getting log file handle:\n{error.strerror} (os error {error.errno})"
        )
    if lines is None:
        return text
    return "\n".join(text.splitlines()[-lines:]) if lines else ""


def kill(client: Client, options: dict) -> str:
    with client.store.transaction() as state:
        if options["task_ids"]:
            matching, failing = split_ids(state, options["task_ids"], lambda t: t["status"] in ACTIVE)
            for task_id in matching:
                kill_task(state["tasks"][str(task_id)])
            return task_response("Tasks are being killed", matching, failing)
        groups = selected_groups(state, options)
        for task in state["tasks"].values():
            if task["group"] in groups and task["status"] in ACTIVE:
                kill_task(task)
        for name in groups:
            state["groups"][name]["status"] = "Paused"  # pueue pauses what it kills by group
    if options["all"]:
        return "All tasks are being killed. All groups will be paused!!!"
    return f'All tasks of group "{groups[0]}" are being killed. The group will also be paused!!!'


def group_list(client: Client, options: dict) -> str:
    groups = render_groups(client.store.read(), client.settings)
    if options["json"]:
        return client.dumps(groups)
    return "\n".join(
        f'Group "{name}" ({group["parallel_tasks"]} parallel): {group["status"].lower()}'
        for name, group in groups.items()
    )


def group_add(client: Client, options: dict) -> str:
    name = options["name"]
    with client.store.transaction() as state:
        if name in state["groups"]:
            raise Failure(f'Group "{name}" already exists')
        parallel = options["parallel"] if options["parallel"] is not None else 1
        state["groups"][name] = {"status": "Running", "parallel_tasks": parallel}
    return f'New group "{name}" has been created'


def group_remove(client: Client, options: dict) -> str:
    name = options["name"]
    with client.store.transaction() as state:
        ensure_group(state, name)
        if name == DEFAULT_GROUP:
            raise Failure("You cannot delete the default group")
        if any(task["group"] == name for task in state["tasks"].values()):
            raise Failure("You cannot remove a group, if there're still tasks in it.")
        del state["groups"][name]
    return f'Group "{name}" has been removed'


def parallel(client: Client, options: dict) -> str:
    name = options["group"] or DEFAULT_GROUP
    with client.store.transaction() as state:
        ensure_group(state, name)["parallel_tasks"] = options["parallel_tasks"]
    return f'Parallel tasks setting for group "{name}" adjusted'


def clean(client: Client, options: dict) -> str:
    with client.store.transaction() as state:
        for task in list(state["tasks"].values()):
            if (
                task["status"] == FINISHED
                and (not options["successful_only"] or task["result"] == "Success")
                and options["group"] in (None, task["group"])
                and removable(state, task["id"], [])
            ):
                drop_task(client.store, state, task["id"])
    text = "All successfully finished tasks have been removed" if options["successful_only"] else (
        "All finished tasks have been removed"
    )
    return text + (f" from group '{options['group']}'" if options["group"] else "")


def remove(client: Client, options: dict) -> str:
    with client.store.transaction() as state:
        matching, failing = split_ids(state, options["task_ids"], lambda t: t["status"] not in ACTIVE)
        for task_id in list(matching):
            if not removable(state, task_id, matching):
                matching.remove(task_id)
                failing.append(task_id)
        for task_id in matching:
            drop_task(client.store, state, task_id)
    return task_response("Tasks removed from list", matching, failing)


def start(client: Client, options: dict) -> str:
    with client.store.transaction() as state:
        if options["task_ids"]:
            startable = ("Paused", "Queued", "Stashed")
            matching, failing = split_ids(state, options["task_ids"], lambda t: t["status"] in startable)
            for task_id in matching:
                _start_task(state["tasks"][str(task_id)])
            return task_response("Tasks have been started/resumed", matching, failing)
        groups = selected_groups(state, options)
        for name in groups:
            state["groups"][name]["status"] = "Running"
        for task in state["tasks"].values():
            if task["group"] in groups and task["status"] == "Paused":
                set_paused(task, False)
    return "All groups are being resumed." if options["all"] else f'Group "{groups[0]}" is being resumed.'


def _start_task(task: dict) -> None:
    if task["status"] == "Paused":
        set_paused(task, False)
        return
    if task["status"] == "Stashed":
        task["status"] = "Queued"
        task["enqueued_at"] = now_ns()
    task["immediate"] = True  # the daemon starts it regardless of group state and limit


def pause(client: Client, options: dict) -> str:
    with client.store.transaction() as state:
        if options["task_ids"]:
            matching, failing = split_ids(state, options["task_ids"], lambda t: t["status"] == "Running")
            for task_id in matching:
                set_paused(state["tasks"][str(task_id)], True)
            return task_response("Tasks have been paused", matching, failing)
        groups = selected_groups(state, options)
        for name in groups:
            state["groups"][name]["status"] = "Paused"
        if not options["wait"]:
            for task in state["tasks"].values():
                if task["group"] in groups and task["status"] == "Running":
                    set_paused(task, True)
    return "All groups are being paused." if options["all"] else f'Group "{groups[0]}" is being paused.'


def reset(client: Client, options: dict) -> str:
    # The daemon finishes the reset (drops every task) once no task process is left.
    with client.store.transaction() as state:
        for group in state["groups"].values():
            group["status"] = "Reset"
        for task in state["tasks"].values():
            if task["status"] in ACTIVE:
                kill_task(task)
    return "Everything is being reset right now."


def shutdown(client: Client, options: dict) -> str:
    pid = client.store.daemon_pid()
    if pid is not None:
        os.kill(pid, signal.SIGTERM)
    return "Daemon is shutting down"


HANDLERS = {
    ("add",): add,
    ("status",): status,
    ("log",): log,
    ("kill",): kill,
    ("group",): group_list,
    ("group", "add"): group_add,
    ("group", "remove"): group_remove,
    ("parallel",): parallel,
    ("clean",): clean,
    ("remove",): remove,
    ("start",): start,
    ("pause",): pause,
    ("reset",): reset,
    ("shutdown",): shutdown,
}
