"""The orchestrator killed (SIGKILL) at every step boundary of a case, then resumed.

Each test runs `mqi submit` as a child that dies at one point, then does what the main job
does after a crash: `reconcile` finds the case (orphaned, or pending for `scan-inbox`) and a
new process-case run resumes it. Whatever the point, the case must complete exactly once:
one remote task for its one attempt, no GPU slot left held, nothing partial among the
results, and events that tell the story.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass
from pathlib import Path

import pytest

from mqi import casework
from mqi.claims import claimed_case_ids
from mqi.ledger.states import AttemptResult, CaseState
from tests.support.cases import (
    case_state,
    make_case,
    run_case,
    settings_for,
    ssh_host,
    start,
    wait_for,
)
from tests.support.faults import (
    active_slots,
    kill_when_transfer_under_way,
    spawn_submit,
    staging_leftovers,
    tasks_labelled,
    tree_digest,
    wait_for_death,
    write_config,
)

pytestmark = pytest.mark.usefixtures("prefect_server")

BIG = 48 * 2**20  # big enough that a transfer over loopback SSH is seen under way
ENGINE = "sleep {seconds}; mkdir -p output && cp RTPLAN.dcm output/dose.dcm && head -c {size} /dev/urandom > output/dose.raw"


@dataclass(frozen=True)
class CrashPoint:
    name: str
    states_after_crash: tuple[CaseState, ...]
    by_transfer: str = ""  # killed by the test while this transfer runs ("upload"/"download")


CRASH_POINTS = [
    CrashPoint("after-register", (CaseState.PENDING,)),
    CrashPoint("during-upload", (CaseState.UPLOADING,), by_transfer="upload"),
    CrashPoint("after-upload", (CaseState.UPLOADING,)),
    CrashPoint("after-add", (CaseState.UPLOADING,)),
    CrashPoint("while-waiting", (CaseState.QUEUED, CaseState.RUNNING)),
    CrashPoint("during-download", (CaseState.DOWNLOADING,), by_transfer="download"),
    CrashPoint("after-download", (CaseState.DOWNLOADING,)),
]


def crash_and_resume(tmp_path: Path, sshd, fake_pueue, prefect_api_url: str, point: CrashPoint,
                     *, slots: int = 1) -> None:
    """One case killed at `point`, then resumed as reconcile would; asserts the invariants.

    One slot: a slot the dead run left held in the ledger would keep the resumed run waiting."""
    host = ssh_host(tmp_path, sshd, fake_pueue, groups=({"name": "default", "slots": slots},))
    output_size = BIG if point.by_transfer == "download" else 1024
    # long enough a run that the first poll sees it unfinished (the crash point is there)
    run_seconds = 3 if point.name == "while-waiting" else 1
    settings = settings_for(tmp_path, [host], command=ENGINE.format(seconds=run_seconds, size=output_size))
    site = start(settings)
    folder = make_case(tmp_path, f"crash-{point.name}")
    if point.by_transfer == "upload":
        (folder / "machine.log").write_bytes(b"\x5a" * BIG)
    config = write_config(tmp_path, settings, prefect_api_url)

    child = spawn_submit(config, folder, crash_at=None if point.by_transfer else point.name)
    if point.by_transfer == "upload":
        uid = _wait_case(site, folder).uid
        kill_when_transfer_under_way(child, Path(host["workdir"]), uid, min_bytes=1)
    elif point.by_transfer == "download":
        kill_when_transfer_under_way(child, settings.results_dir, folder.name, min_bytes=1)
    else:
        assert wait_for_death(child) == -signal.SIGKILL

    case = site.ledger.find_case(str(folder))
    assert case.state in point.states_after_crash, f"died in {case.state}, expected {point.states_after_crash}"
    results = settings.results_dir / folder.name
    if point.name != "after-download":  # there the verified results were in place before the crash
        assert not results.exists(), "results visible before the case completed"
    assert case.id not in claimed_case_ids(settings.state_dir), "a dead process still claims the case"
    found_by_reconcile = (casework.cases_to_start(site, set()) if case.state is CaseState.PENDING
                          else casework.orphaned_cases(site, set()))
    assert case.id in [c.id for c in found_by_reconcile]
    if point.name == "after-add":  # the task exists, the ledger lacks its id: reconcile adopts it
        assert site.ledger.live_attempt(case.id).task_id is None
        assert len(casework.adopt_unknown_tasks(site, host["name"], "reconcile")) == 1

    assert run_case(folder) == "completed"

    case = site.ledger.find_case(str(folder))
    [attempt] = site.ledger.attempts(case.id)
    assert attempt.result is AttemptResult.SUCCESS
    assert tasks_labelled(fake_pueue, attempt.label) == (1, 1), "not exactly one remote task for the attempt"
    assert tree_digest(results) == tree_digest(Path(attempt.remote_dir) / "output")
    assert staging_leftovers(settings.results_dir) == [], "partial downloads left among the results"
    events = site.ledger.events(case.id)
    assert events[-1].to_state is CaseState.COMPLETED
    assert [e.to_state for e in events].count(CaseState.COMPLETED) == 1
    runs = list(dict.fromkeys(e.actor for e in events))  # who did what: the dead run, then the new one
    assert len(runs) == 2 and all(r.startswith("flow-run/") for r in runs), runs
    limit = site.placement(host["name"], "default").limit_name
    assert site.ledger.slot_holders() == {}, "a GPU slot is still held after the case completed"
    wait_for(lambda: active_slots(limit) == 0, timeout=30, what="Prefect's limit to show the slot given back")


def _wait_case(site, folder):
    wait_for(lambda: case_state(site, folder) is not None, timeout=90, what="the child to register the case")
    return site.ledger.find_case(str(folder))


@pytest.mark.parametrize("point", CRASH_POINTS, ids=[p.name for p in CRASH_POINTS])
def test_killed_at_each_step_the_case_completes_once(tmp_path, sshd, fake_pueue, prefect_server, point):
    crash_and_resume(tmp_path, sshd, fake_pueue, prefect_server, point)
