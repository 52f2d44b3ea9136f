"""The JSON pueue prints, in the v3 or the v4 form, built from the internal task records."""

from __future__ import annotations

from .store import rfc3339


def render_state(state: dict, settings: dict, group: str | None = None) -> dict:
    tasks = {
        key: render_task(task, settings)
        for key, task in sorted(state["tasks"].items(), key=lambda item: int(item[0]))
        if group is None or task["group"] == group
    }
    return {"tasks": tasks, "groups": render_groups(state, settings)}


def render_groups(state: dict, settings: dict) -> dict:
    groups = {}
    for name in sorted(state["groups"]):
        group = state["groups"][name]
        status = group["status"]
        if status == "Reset" and settings["format"] == "v3":
            status = "Running"  # v3 has no Reset state: it resets without showing it
        groups[name] = {"status": status, "parallel_tasks": group["parallel_tasks"]}
    return groups


def render_task(task: dict, settings: dict, *, with_envs: bool = True) -> dict:
    def time(field: str) -> str | None:
        return rfc3339(task[field], settings)

    common = {
        "id": task["id"],
        "created_at": time("created_at"),
    }
    if settings["format"] == "v3":
        common["enqueued_at"] = time("enqueued_at")
    common.update(
        original_command=task["original_command"],
        command=task["command"],
        path=task["path"],
        envs=task["envs"] if with_envs else {},
        group=task["group"],
        dependencies=task["dependencies"],
        priority=task["priority"],
        label=task["label"],
    )
    if settings["format"] == "v3":
        common["status"] = _v3_status(task["status"], task)
        common["prev_status"] = _v3_status(task["created_status"], task)
        common["start"] = time("start")
        # v3's restore_state sets Done(Killed) without touching the end time it never had
        common["end"] = None if task.get("restored_kill") else time("end")
    else:
        common["status"] = _v4_status(task, time)
    return common


def _v3_status(status: str, task: dict):
    if status == "Stashed":
        return {"Stashed": {"enqueue_at": None}}
    if status == "Done":
        return {"Done": task["result"]}
    return status


def _v4_status(task: dict, time) -> dict:
    status = task["status"]
    if status == "Stashed":
        return {"Stashed": {"enqueue_at": None}}
    if status == "Queued":
        return {"Queued": {"enqueued_at": time("enqueued_at")}}
    if status in ("Running", "Paused"):
        return {status: {"enqueued_at": time("enqueued_at"), "start": time("start")}}
    return {
        "Done": {
            "enqueued_at": time("enqueued_at"),
            "start": time("start"),
            "end": time("end"),
            "result": task["result"],
        }
    }
