"""`reconcile`: put right what crashes, outages and GPU server restarts left behind."""

from __future__ import annotations

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.events import emit_event

from mqi import casework, restarts
from mqi.host_health import awaiting_operator, reachable_hosts
from mqi.host_report import artifact_rows, host_reports
from mqi.queue.base import QueueError
from mqi.runtime import get_site
from mqi.transport.base import TransportError
from tasks.launch import launch_cases, running_case_ids
from tasks import publish


@task(name="adopt-unknown-tasks")
def adopt_unknown_tasks() -> list[str]:
    """Our labelled tasks that the ledger lacks (a crash right after `pueue add`)."""
    site = get_site()
    notes = []
    for host in site.settings.hosts:
        if awaiting_operator(site.settings.state_dir, host.name):  # asked at its back-off only
            notes.append(f"host {host.name}: not checked: refused, needs an operator (see `mqi hosts`)")
            continue
        try:
            notes += casework.adopt_unknown_tasks(site, host.name, "reconcile")
        except TransportError as exc:
            notes.append(f"host {host.name}: not checked: {exc}")
    return notes


@task(name="kill-stray-tasks")
def kill_stray_tasks() -> list[str]:
    """Our tasks still in a queue whose attempts have ended (added as a cancel came, by a run
    that then died): killed, so that a cancelled case never runs on a GPU."""
    site = get_site()
    notes = []
    for host in site.settings.hosts:
        try:
            notes += casework.kill_stray_tasks(site, host.name)
        except TransportError as exc:
            notes.append(f"host {host.name}: not checked for stray tasks: {exc}")
    return notes


@task(name="resume-orphaned-cases")
def resume_orphaned_cases() -> list[str]:
    """Cases whose process-case run died (crash, reboot) get a new run that resumes them,
    including an unconfirmed kill (the new run kills and confirms)."""
    site = get_site()
    orphans = casework.orphaned_cases(site, running_case_ids())
    launch_cases(orphans)
    return [f"case {c.name}: resumed from {c.state.value}" for c in orphans]


@task(name="resume-groups-paused-by-restart")
def resume_groups_paused_by_restart() -> list[str]:
    """Groups holding our queued tasks that a pueue daemon restart paused are started again;
    a group a person paused is left paused, its cause kept for `mqi hosts`, announced once."""
    site = get_site()
    notes = []
    usable = reachable_hosts(site.settings.state_dir, [host.name for host in site.settings.hosts])
    for host in site.settings.hosts:
        if host.name not in usable:
            continue  # marked down: looked at again once it answers
        try:
            paused = restarts.check_paused_groups(site, host.name)
        except (TransportError, QueueError) as exc:
            notes.append(f"host {host.name}: paused groups not checked: {exc}")
            continue
        for group in paused:
            if group.announce:
                emit_group_paused_event(group)
            notes.append(group.note)
    return notes


def emit_group_paused_event(paused: restarts.PausedGroup) -> None:
    """`mqi.group.paused`: a group holding our cases was paused by a person, not a restart."""
    emit_event(
        "mqi.group.paused",
        resource={"prefect.resource.id": f"mqi.group.{paused.host}.{paused.group}",
                  "prefect.resource.name": f"{paused.host}/{paused.group}"},
        related=[{"prefect.resource.id": f"mqi.host.{paused.host}", "prefect.resource.role": "host"}],
        payload={"cause": paused.verdict.why, "waiting_cases": paused.waiting},
    )


@task(name="repair-gpu-limits")
def repair_gpu_limits() -> list[str]:
    """Prefect's GPU limits made what the ledger says (a server restart loses leases, a dead
    holder leaves slots counted): at most one reconcile interval of GPU time is lost."""
    try:
        return publish.repair_gpu_limits(get_site())
    except Exception as exc:  # a busy or absent server: admission does not need it, the next reconcile repairs
        return [f"GPU limits not repaired this time: {exc}"]


@task(name="report-hosts")
def report_hosts() -> list[str]:
    """Each host's reachability, groups and GPUs as a table artifact (the UI's host view)."""
    reports = host_reports(get_site(), recheck_refused=False)  # refused: asked at its back-off only
    create_table_artifact(table=artifact_rows(reports), key="mqi-hosts", description="GPU hosts, groups and GPUs")
    return [f"host {r.name}: unreachable: {r.reason}" for r in reports if not r.reachable]


@flow(name="reconcile")
def reconcile() -> list[str]:
    """Adopt lost task ids, kill stray tasks, resume orphaned cases, start groups a pueue restart
    paused, repair the GPU limits."""
    notes = (adopt_unknown_tasks() + kill_stray_tasks() + resume_orphaned_cases() + resume_groups_paused_by_restart()
             + repair_gpu_limits() + report_hosts())
    for note in notes:
        get_run_logger().info(note)
    if notes:
        create_table_artifact(table=[{"finding": n} for n in notes], key="reconcile-findings",
                              description="what reconcile found and did")
    return notes
