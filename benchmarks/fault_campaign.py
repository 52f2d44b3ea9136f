"""Inject each fault N times and publish the figures in docs/reliability.md.

    python benchmarks/fault_campaign.py --rounds 3

Runs the fault-injection tests (tests/test_faults_*.py) N times each in one pytest session
(one Prefect test server, one sshd) and counts, per fault, how many runs ended with every
case in the right state. A run that fails on a results check (results differ from the host's,
or partial results left) counts as data lost. The table replaces the one between the
campaign markers in docs/reliability.md.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "reliability.md"
TESTS = ["tests/test_faults_crash.py", "tests/test_faults_network.py"]
START, END = "<!-- fault-campaign:start -->", "<!-- fault-campaign:end -->"
# assertion texts of the tests that mean results were wrong or partial, not merely late
DATA_LOSS = re.compile(r"tree_digest|partial|results visible before")

FAULTS = {
    "test_killed_at_each_step_the_case_completes_once": "orchestrator SIGKILLed {}",
    "test_cases_waiting_through_a_20_second_ssh_outage_all_complete": "sshd down 20 s while 3 cases wait",
    "test_connection_cut_mid_transfer_is_retried_and_verified": "SSH connections cut mid-{}",
    "test_pueue_daemon_restart_needs_no_person": "pueue daemon restart ({}) with a case queued behind",
    "test_a_task_killed_by_a_person_is_an_infrastructure_failure_not_retried": "task killed by `pueue kill` while it runs",
    "test_a_group_paused_by_a_person_is_left_paused_shown_with_its_cause_and_announced_once":
        "pueue group paused by a person while a case waits",
    "test_task_cleaned_before_seen_done_is_decided_from_its_results_and_a_reused_id_is_not_ours":
        "`pueue clean` before seen done, id reused by another task",
    "test_task_cleaned_without_results_is_lost_with_a_clear_reason": "`pueue clean` of a task that left no results",
    "test_ledger_locked_by_another_process_delays_but_loses_no_step": "SQLite ledger write-locked 5 s",
    "test_local_disk_full_while_downloading_never_completes_the_case": "local disk full while downloading",
}


class Campaign:
    """A pytest plugin: every test runs `rounds` times; outcomes are tallied per fault."""

    def __init__(self, rounds: int):
        self.rounds = rounds
        self.runs: dict[str, list[str]] = defaultdict(list)  # fault -> "ok" / "failed" / "lost"

    @pytest.fixture
    def campaign_round(self, request):
        return request.param

    def pytest_generate_tests(self, metafunc):
        metafunc.fixturenames.append("campaign_round")
        metafunc.parametrize("campaign_round", range(self.rounds), indirect=True, ids=lambda n: f"round{n}")

    def pytest_runtest_logreport(self, report):
        if report.when == "call" or (report.when == "setup" and report.failed):
            outcome = "ok" if report.passed else "lost" if DATA_LOSS.search(str(report.longrepr)) else "failed"
            self.runs[fault_name(report.nodeid)].append(outcome)


def fault_name(nodeid: str) -> str:
    function, _, params = nodeid.split("::")[-1].partition("[")
    params = re.sub(r"(^|-)round\d+(?=-|$)", "", params.rstrip("]")).strip("-")
    template = FAULTS.get(function, function)
    return template.format(params) if "{}" in template else template


def table(runs: dict[str, list[str]], rounds: int, seconds: float) -> str:
    lines = [
        f"{rounds} round(s), {seconds / 60:.1f} min, {time.strftime('%Y-%m-%d', time.gmtime())} (UTC).",
        "",
        "| fault | injected | survived | data lost |",
        "| --- | ---: | ---: | ---: |",
    ]
    for fault, outcomes in runs.items():
        lines.append(f"| {fault} | {len(outcomes)} | {outcomes.count('ok')} | {outcomes.count('lost')} |")
    return "\n".join(lines)


def publish(text: str) -> None:
    doc = DOC.read_text()
    before, _, rest = doc.partition(START)
    _, _, after = rest.partition(END)
    DOC.write_text(f"{before}{START}\n{text}\n{END}{after}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="times each fault is injected")
    parser.add_argument("-k", default=None, help="only faults whose test matches (pytest -k)")
    args = parser.parse_args()
    campaign = Campaign(args.rounds)
    started = time.monotonic()
    pytest_args = [*TESTS, "-q", "-p", "no:cacheprovider", "--rootdir", str(ROOT)]
    if args.k:
        pytest_args += ["-k", args.k]
    code = pytest.main(pytest_args, plugins=[campaign])
    text = table(campaign.runs, args.rounds, time.monotonic() - started)
    print(text)
    publish(text)
    return int(code)


if __name__ == "__main__":
    sys.exit(main())
