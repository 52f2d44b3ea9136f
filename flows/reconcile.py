"""`reconcile`: put right what crashes and outages left behind."""

from __future__ import annotations

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact

from mqi import casework, claims
from mqi.host_health import awaiting_operator
from mqi.host_report import artifact_rows, host_reports
from mqi.ledger.states import AttemptResult, CaseState
from mqi.runtime import get_site
from mqi.transport.base import TransportError
from tasks.launch import launch_cases, running_case_ids
from tasks.publish import held_slots, release_orphaned_lease


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


@task(name="retry-unconfirmed-kills")
def retry_unconfirmed_kills() -> list[str]:
    site = get_site()
    notes = []
    for case in site.ledger.cases_in_states([CaseState.KILLING]):
        attempt = site.ledger.live_attempt(case.id)
        if attempt is not None and case.id not in running_case_ids():
            confirmed = casework.kill(site, case, attempt, AttemptResult.TIMEOUT, "kill retried by reconcile",
                                      "reconcile")
            notes.append(f"case {case.name}: kill {'confirmed' if confirmed else 'still not confirmed'}")
    return notes


@task(name="resume-orphaned-cases")
def resume_orphaned_cases() -> list[str]:
    """Cases whose process-case run died (crash, reboot) get a new run that resumes them."""
    site = get_site()
    orphans = [c for c in casework.orphaned_cases(site, running_case_ids()) if c.state is not CaseState.KILLING]
    launch_cases(orphans)
    return [f"case {c.name}: resumed from {c.state.value}" for c in orphans]


@task(name="release-orphaned-slots")
def release_orphaned_slots() -> list[str]:
    """GPU slots recorded by processes that died are given back at once."""
    state_dir = get_site().settings.state_dir
    notes = []
    for case_id in claims.orphaned_leases(state_dir):
        if release_orphaned_lease(state_dir, case_id):
            notes.append(f"case {case_id}: released the GPU slot of its dead flow run")
    return notes


@task(name="report-held-slots")
def report_held_slots() -> list[str]:
    """GPU slots held in Prefect beyond the live attempts the ledger knows of."""
    site = get_site()
    live = casework.live_attempts_per_group(site)
    notes = []
    for (host, group), held in held_slots(site.settings).items():
        if held > live.get((host, group), 0):
            notes.append(f"{host}/{group}: {held} slot(s) held, {live.get((host, group), 0)} live case(s); "
                         "a dead holder's lease runs out by itself")
    return notes


@task(name="report-hosts")
def report_hosts() -> list[str]:
    """Each host's reachability, groups and GPUs as a table artifact (the UI's host view)."""
    reports = host_reports(get_site(), recheck_refused=False)  # refused: asked at its back-off only
    create_table_artifact(table=artifact_rows(reports), key="mqi-hosts", description="GPU hosts, groups and GPUs")
    return [f"host {r.name}: unreachable: {r.reason}" for r in reports if not r.reachable]


@flow(name="reconcile")
def reconcile() -> list[str]:
    """Adopt lost task ids, retry kills, resume orphaned cases, report stray GPU slots."""
    notes = (adopt_unknown_tasks() + release_orphaned_slots() + retry_unconfirmed_kills() + resume_orphaned_cases()
             + report_held_slots() + report_hosts())
    for note in notes:
        get_run_logger().info(note)
    if notes:
        create_table_artifact(table=[{"finding": n} for n in notes], key="reconcile-findings",
                              description="what reconcile found and did")
    return notes
