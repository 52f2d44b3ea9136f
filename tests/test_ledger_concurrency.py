"""Several processes on one ledger at once, with real processes (not threads)."""

from __future__ import annotations

import multiprocessing
import traceback
from pathlib import Path

from mqi.ledger import AttemptResult, CaseState, Ledger
from tests.support.databases import sqlite_url

SPAWN = multiprocessing.get_context("spawn")  # children share nothing with the test process
WAIT_SECONDS = 120


def _report_errors(work, results, *args) -> None:
    try:
        results.put(("ok", work(*args)))
    except BaseException:  # noqa: BLE001 (everything must reach the parent)
        results.put(("error", traceback.format_exc()))


def _register_in_step(url: str, folders: list[str], barrier) -> list[tuple[str, int, bool]]:
    barrier.wait()  # open (and migrate) at the same moment too
    with Ledger.open(url) as ledger:
        registered = []
        for folder in folders:
            barrier.wait()
            case, created = ledger.register_case(folder)
            registered.append((folder, case.id, created))
        return registered


def _process_cases(url: str, worker: int, count: int, shared_folder: str, barrier) -> int:
    barrier.wait()
    with Ledger.open(url) as ledger:
        ledger.register_case(shared_folder, actor=f"worker-{worker}")
        for number in range(count):
            case, _ = ledger.register_case(f"{shared_folder}-{worker}-{number}")
            attempt = ledger.start_attempt(
                case.id, host=f"gpu{worker}", group="g0", label=case.uid, remote_dir="/r"
            )
            for state in (CaseState.UPLOADING, CaseState.QUEUED, CaseState.RUNNING):
                ledger.transition(case.id, state, actor=f"worker-{worker}", attempt_id=attempt.id)
            ledger.update_attempt(attempt.id, task_id=number)
            ledger.set_progress(case.id, 50)
            ledger.finish_attempt(attempt.id, AttemptResult.SUCCESS, exit_code=0)
            for state in (CaseState.DOWNLOADING, CaseState.COMPLETED):
                ledger.transition(case.id, state, actor=f"worker-{worker}", attempt_id=attempt.id)
        return count


def run_processes(target, argument_lists: list[tuple]) -> list:
    """Run target(*arguments) in one process per entry; their results, or fail with their traces."""
    results = SPAWN.Queue()
    processes = [
        SPAWN.Process(target=_report_errors, args=(target, results, *arguments))
        for arguments in argument_lists
    ]
    for process in processes:
        process.start()
    outcomes = [results.get(timeout=WAIT_SECONDS) for _ in processes]
    for process in processes:
        process.join(timeout=WAIT_SECONDS)
    errors = [detail for status, detail in outcomes if status == "error"]
    assert not errors, "a writer process failed:\n" + "\n".join(errors)
    return [detail for _, detail in outcomes]


def test_two_processes_registering_the_same_folders_get_one_case_each(ledger_url, tmp_path):
    folders = [str(tmp_path / f"case_{n}") for n in range(15)]
    barrier = SPAWN.Barrier(2)

    outcomes = run_processes(_register_in_step, [(ledger_url, folders, barrier)] * 2)

    first, second = outcomes
    for (folder, id_a, created_a), (_, id_b, created_b) in zip(first, second, strict=True):
        assert id_a == id_b, f"{folder} was registered twice"
        assert created_a != created_b, f"{folder}: exactly one process must have created it"
    with Ledger.open(ledger_url) as ledger:
        cases = ledger.list_cases()
        assert sorted(c.source for c in cases) == sorted(folders)
        assert all(len(ledger.events(c.id)) == 1 for c in cases)


def test_eight_sqlite_writers_never_see_a_locked_database(tmp_path):
    url = sqlite_url(tmp_path)
    writers, per_writer = 8, 8
    barrier = SPAWN.Barrier(writers)
    shared = str(tmp_path / "shared")

    outcomes = run_processes(
        _process_cases, [(url, worker, per_writer, shared, barrier) for worker in range(writers)]
    )

    assert outcomes == [per_writer] * writers
    with Ledger.open(url) as ledger:
        cases = ledger.list_cases()
        assert len(cases) == writers * per_writer + 1
        finished = [c for c in cases if c.source != shared]
        assert {c.state for c in finished} == {CaseState.COMPLETED}
        assert all(ledger.attempts(c.id)[-1].result is AttemptResult.SUCCESS for c in finished)
        assert all(len(ledger.events(c.id)) == 6 for c in finished)
        assert Path(ledger.find_case(shared).source) == Path(shared)
