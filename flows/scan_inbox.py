"""`scan-inbox`: register complete case folders and start as many cases as slots allow.

`mqi run` does the same in its own loop (flows/main_job.py); this flow is for sites that run
it on a schedule through a worker, and for a scan started from the UI.
"""

from __future__ import annotations

from prefect import flow, get_run_logger, task

from mqi import casework
from mqi.inbox import InboxScanner
from mqi.runtime import get_site
from tasks.launch import launch_cases, running_case_ids


@task(name="register-new-folders")
def register_new_folders() -> int:
    site = get_site()
    return casework.register_ready_folders(site, InboxScanner(site.settings.inbox), actor="scan-inbox")


@task(name="start-waiting-cases")
def start_waiting_cases() -> int:
    site = get_site()
    cases = casework.cases_to_start(site, running_case_ids())
    launch_cases(cases)
    return len(cases)


@flow(name="scan-inbox")
def scan_inbox() -> dict[str, int]:
    """New folders become pending cases; the oldest pending cases start as slots free up."""
    registered = register_new_folders()
    started = start_waiting_cases()
    get_run_logger().info("registered %d new case(s), started %d", registered, started)
    return {"registered": registered, "started": started}
