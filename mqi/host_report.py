"""What `mqi hosts` shows: for each configured host, whether it answers and what it is doing.

Each host is asked, through its usual transport and queue, for its pueue version, one queue
snapshot (the state of its groups, running and queued tasks) and its GPUs. Hosts are asked at
the same time, each in its own daemon thread, and the report waits at most `timeout` seconds
for all of them: a dead host is reported as not answering instead of stalling the rest, and a
thread still stuck on it does not keep the process alive.

What the check finds about reachability is recorded in the host health files
(`mqi.host_health`), so running `mqi hosts` also brings a recovered host back into placement
(a host refused for its key or our credentials too, once the operator has fixed them).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from datetime import tzinfo
from typing import Any

from mqi.gpu import Gpu, GpuProcess, in_devices, query_gpus
from mqi.group_sightings import GroupRecord, group_records
from mqi.host_health import HostHealth, awaiting_operator, host_health
from mqi.queue.base import QueueError, QueueSnapshot, TaskState
from mqi.settings import HostSettings
from mqi.site import Site
from mqi.timefmt import utc_now
from mqi.transport.base import HostRefused, TransportError

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 15.0
LOCAL_QUEUE = "local queue"
RUNNING_STATES = {TaskState.RUNNING, TaskState.PAUSED}  # a paused task still holds its slot
WAITING_STATES = {TaskState.QUEUED, TaskState.LOCKED, TaskState.STASHED}


@dataclass(frozen=True)
class GroupReport:
    name: str
    slots: int  # configured
    devices: str | None
    on_host: str | None = None  # "ok", "missing" or "paused"; None when the queue did not answer
    running: int = 0
    queued: int = 0
    pause_cause: str | None = None  # why it is paused, as reconcile found (None: not looked into)


@dataclass(frozen=True)
class GpuLine:
    gpu: Gpu
    foreign: tuple[GpuProcess, ...]  # compute processes on this GPU that are not our tasks


@dataclass(frozen=True)
class HostReport:
    name: str
    address: str
    reachable: bool
    reason: str | None = None  # why it is not reachable
    needs_operator: bool = False  # refused (host key, credentials): a retry cannot help
    queue: str | None = None  # pueue's version line, or LOCAL_QUEUE
    queue_problem: str | None = None  # reachable, but its queue refused (daemon down, ...)
    groups: tuple[GroupReport, ...] = ()
    gpus: tuple[GpuLine, ...] = ()
    gpu_problem: str | None = None  # e.g. nvidia-smi not available
    health: HostHealth | None = None
    seconds: float = 0.0  # how long the check took


# -- gathering ------------------------------------------------------------------------------


def host_reports(
    site: Site, timeout: float = DEFAULT_TIMEOUT, *, recheck_refused: bool = True
) -> list[HostReport]:
    """Every configured host, in configured order, checked concurrently within `timeout`.
    `recheck_refused` False: a host refused (needs an operator) is reported as recorded until
    its next check is due, not asked again (the main job's reconcile runs every minute)."""
    reports: dict[str, HostReport] = {}
    threads = []
    for host in site.settings.hosts:
        thread = threading.Thread(
            target=_check_into,
            args=(reports, site, host, timeout, recheck_refused),
            name=f"mqi-hosts-{host.name}",
            daemon=True,
        )
        thread.start()
        threads.append(thread)
    deadline = time.monotonic() + timeout
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    return [
        reports.get(host.name)
        or _unanswered(site, host, f"no answer within {timeout:g} s", timeout)
        for host in site.settings.hosts
    ]


def _check_into(
    reports: dict[str, HostReport],
    site: Site,
    host: HostSettings,
    timeout: float,
    recheck_refused: bool,
) -> None:
    started = time.monotonic()
    try:
        if not recheck_refused and awaiting_operator(site.settings.state_dir, host.name):
            reason = host_health(site.settings.state_dir, host.name).reason
            reports[host.name] = _unanswered(site, host, reason, 0.0, needs_operator=True)
            return
        reports[host.name] = check_host(site, host, timeout)
    except Exception as error:  # a surprise on one host must not hide the others
        log.exception("checking host %s failed", host.name)
        reason = f"check failed: {type(error).__name__}: {error}"
        reports[host.name] = _unanswered(site, host, reason, time.monotonic() - started)


def check_host(site: Site, host: HostSettings, timeout: float) -> HostReport:
    """One host: queue and GPUs through its transport; records its health."""
    started = time.monotonic()
    command_timeout = min(timeout, host.command_timeout)
    try:
        asked_at = utc_now()
        queue, snapshot, queue_problem = _queue_state(site, host, command_timeout)
        answered_at = utc_now()
        gpu_report = query_gpus(site.transport(host.name), command_timeout, host.nvidia_smi)
    except TransportError as error:
        site.note_host_call(host.name, error)  # through the site: news is announced (reconcile)
        return _unanswered(site, host, str(error), time.monotonic() - started,
                           needs_operator=isinstance(error, HostRefused))
    if snapshot is not None:
        site.note_groups_seen(host.name, snapshot, asked_at, answered_at)
    return HostReport(
        host.name,
        address(host),
        reachable=True,
        queue=queue,
        queue_problem=queue_problem,
        groups=group_reports(host, snapshot, group_records(site.settings.state_dir, host.name)),
        gpus=tuple(GpuLine(gpu, gpu_report.foreign_on(gpu)) for gpu in gpu_report.gpus),
        gpu_problem=gpu_report.problem,
        health=site.note_host_call(host.name, None),
        seconds=time.monotonic() - started,
    )


def address(host: HostSettings) -> str:
    if host.transport == "local":
        return "this machine"
    return f"{host.username}@{host.hostname}:{host.port}"


def _queue_state(
    site: Site, host: HostSettings, timeout: float
) -> tuple[str | None, QueueSnapshot | None, str | None]:
    """(version, snapshot, problem): a queue that refuses leaves the host reachable."""
    queue = site.queue(host.name)
    version = LOCAL_QUEUE if host.queue == "local" else pueue_version(site, host, timeout)
    try:
        return version, queue.snapshot(), None
    except QueueError as error:
        return version, None, str(error)


def pueue_version(site: Site, host: HostSettings, timeout: float) -> str:
    """`pueue --version`, with the same PATH the pueue client gets (see PueueQueue)."""
    queue = site.queue(host.name)
    argv = ["env", f"PATH={queue.path_env}", queue.pueue, "--version"]
    result = site.transport(host.name).run(argv, timeout=timeout)
    lines = [line.strip() for line in result.out.splitlines() if line.strip()]
    if result.exit_code != 0 or not lines:
        return f"unknown (`{host.pueue} --version` exited with {result.exit_code})"
    return lines[-1]


def group_reports(
    host: HostSettings, snapshot: QueueSnapshot | None, records: dict[str, GroupRecord] | None = None
) -> tuple[GroupReport, ...]:
    """The configured groups, with their state and task counts on the host when known, and
    the recorded cause of a pause."""
    records = records or {}
    if snapshot is None:
        return tuple(GroupReport(g.name, g.slots, g.devices) for g in host.groups)
    reports = []
    for group in host.groups:
        found = snapshot.groups.get(group.name)
        on_host = "missing" if found is None else "paused" if found.paused else "ok"
        tasks = [t for t in snapshot.tasks.values() if t.group == group.name]
        running = sum(t.state in RUNNING_STATES for t in tasks)
        queued = sum(t.state in WAITING_STATES for t in tasks)
        record = records.get(group.name)
        cause = record.pause_cause if on_host == "paused" and record is not None else None
        reports.append(
            GroupReport(group.name, group.slots, group.devices, on_host, running, queued, cause)
        )
    return tuple(reports)


def _unanswered(
    site: Site, host: HostSettings, reason: str, seconds: float, *, needs_operator: bool = False
) -> HostReport:
    return HostReport(
        host.name,
        address(host),
        reachable=False,
        reason=reason,
        needs_operator=needs_operator,
        groups=group_reports(host, None),
        health=host_health(site.settings.state_dir, host.name),
        seconds=seconds,
    )


# -- presenting ---------------------------------------------------------------------------


def report_json(report: HostReport, zone: tzinfo) -> dict[str, Any]:
    """One host in `mqi hosts --json`; times in `zone`."""
    return {
        "host": report.name,
        "address": report.address,
        "reachable": report.reachable,
        "reason": report.reason,
        "needs_operator": report.needs_operator,
        "queue": report.queue,
        "queue_problem": report.queue_problem,
        "groups": [
            {
                "name": g.name,
                "slots": g.slots,
                "devices": g.devices,
                "on_host": g.on_host,
                "running": g.running,
                "queued": g.queued,
                "pause_cause": g.pause_cause,
            }
            for g in report.groups
        ],
        "gpus": [_gpu_json(line) for line in report.gpus],
        "gpu_problem": report.gpu_problem,
        "health": report.health and _health_json(report.health, zone),
        "seconds": round(report.seconds, 3),
    }


def _gpu_json(line: GpuLine) -> dict[str, Any]:
    gpu = line.gpu
    return {
        "index": gpu.index,
        "uuid": gpu.uuid,
        "name": gpu.name,
        "utilization_percent": gpu.utilization_percent,
        "memory_used_mib": gpu.memory_used_mib,
        "memory_total_mib": gpu.memory_total_mib,
        "foreign_processes": [
            {"pid": p.pid, "name": p.name, "used_memory_mib": p.used_memory_mib}
            for p in line.foreign
        ],
    }


def _health_json(health: HostHealth, zone: tzinfo) -> dict[str, Any]:
    def local(moment):
        return moment and moment.astimezone(zone).isoformat()

    return {
        "reachable": health.reachable,
        "since": local(health.since),
        "reason": health.reason,
        "last_checked": local(health.last_checked),
        "next_check": local(health.next_check()),
    }


def status_text(report: HostReport) -> str:
    """'reachable', 'UNREACHABLE: why', or 'REFUSED, needs an operator: why'."""
    if report.reachable:
        return "reachable"
    if report.needs_operator:
        return f"REFUSED, needs an operator: {report.reason}"
    return f"UNREACHABLE: {report.reason}"


def health_text(health: HostHealth | None, zone: tzinfo) -> str:
    """What placement makes of the host, from its recorded health."""
    if health is None or health.reachable is not False:
        return "used"
    since, retry_at = health.since.astimezone(zone), health.next_check().astimezone(zone)
    why = "refused" if health.needs_operator else "down"
    return f"skipped ({why} since {since:%m-%d %H:%M}) until {retry_at:%m-%d %H:%M}"


def _on_host_text(group: GroupReport) -> str:
    return f"paused: {group.pause_cause}" if group.pause_cause else group.on_host or "?"


def gpu_text(gpu: Gpu) -> str:
    """'35% 1000/40960 MiB', with '?' for what nvidia-smi could not read."""

    def known(value: int | None) -> str:
        return "?" if value is None else str(value)

    return f"{known(gpu.utilization_percent)}% {known(gpu.memory_used_mib)}/{known(gpu.memory_total_mib)} MiB"


def foreign_text(line: GpuLine) -> str:
    return ", ".join(f"{p.name} (pid {p.pid})" for p in line.foreign)


def artifact_rows(reports: list[HostReport]) -> list[dict[str, Any]]:
    """Rows for a Prefect table artifact: one per configured group of each host."""
    rows = []
    for report in reports:
        for group in report.groups:
            gpus = [line for line in report.gpus if in_devices(line.gpu, group.devices)]
            rows.append(
                {
                    "host": report.name,
                    "status": status_text(report),
                    "queue": report.queue_problem or report.queue or "",
                    "group": group.name,
                    "slots": group.slots,
                    "on host": _on_host_text(group),
                    "running": group.running,
                    "queued": group.queued,
                    "gpus": "; ".join(f"{line.gpu.index}: {gpu_text(line.gpu)}" for line in gpus)
                    or report.gpu_problem
                    or "",
                    "foreign processes": "; ".join(
                        foreign_text(line) for line in gpus if line.foreign
                    ),
                }
            )
    return rows
