"""`scan-inbox`: register complete case folders and start as many cases as slots allow."""

from __future__ import annotations

from prefect import flow, get_run_logger, task

from mqi import casework
from mqi.inbox import InboxScanner
from mqi.ledger.store import folder_key
from mqi.runtime import get_site
from tasks.launch import launch_cases, running_case_ids


@task(name="register-new-folders")
def register_new_folders() -> int:
    site = get_site()
    scanner = InboxScanner(site.settings.inbox)
    known = {case.source for case in site.ledger.list_cases()}
    new = 0
    for ready in scanner.scan(known=lambda path: folder_key(path) in known).ready:
        _, created = site.ledger.register_case(ready.path, actor="scan-inbox")
        new += created
    return new


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
