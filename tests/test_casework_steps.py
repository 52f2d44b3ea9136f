"""The steps around the engine: uploads that look on the host only when needed, and waiting
with one status per poll interval, whatever else a round of polling does."""

from __future__ import annotations

import time

from mqi import casework
from mqi.ledger.states import AttemptResult
from mqi.site import Site
from tests.support.cases import local_host, make_case, settings_for

POLL = 1.0
SLOW_PROGRESS_READ = 0.3


def test_the_next_check_comes_one_poll_interval_after_the_last_status_not_after_the_progress_read(tmp_path):
    site = Site(settings_for(tmp_path, [local_host(tmp_path)], command="sleep 2.5", poll_seconds=POLL))
    case, _ = site.ledger.register_case(make_case(tmp_path, "case-w"))
    placement = casework.choose_placement(site, case)
    assert casework.upload(site, case, placement, "test")
    attempt = casework.admit_and_submit(site, case, [placement], "test")
    queue = site.queue(placement.host.name)
    read_quickly = queue.log_tails

    def slow_log_read(*args, **kwargs):
        time.sleep(SLOW_PROGRESS_READ)  # the progress read after the first status takes a while
        return read_quickly(*args, **kwargs)

    queue.log_tails = slow_log_read
    pauses = []

    def pause(seconds):
        pauses.append(seconds)
        time.sleep(seconds)

    outcome = casework.Waiter(site, case, attempt, "test", sleep=pause).wait()

    assert outcome.result is AttemptResult.SUCCESS
    assert len(pauses) >= 2, pauses
    assert POLL - SLOW_PROGRESS_READ - 0.15 < pauses[0] < POLL - SLOW_PROGRESS_READ + 0.05, pauses
    assert all(p <= POLL for p in pauses), pauses


def test_only_a_case_uploaded_before_looks_for_its_folder_on_the_host(tmp_path, monkeypatch):
    """A first upload sends at once; after an interrupted upload, a complete copy on the host is reused."""
    from mqi import transfer
    from mqi.ledger.states import CaseState

    site = Site(settings_for(tmp_path, [local_host(tmp_path)]))
    case, _ = site.ledger.register_case(make_case(tmp_path, "case-u"))
    placement = casework.choose_placement(site, case)
    real_upload, uploads = transfer.upload_case, []
    monkeypatch.setattr(transfer, "upload_case", lambda *a, **kw: uploads.append((kw["may_be_there"],
                                                                                   real_upload(*a, **kw))))

    assert casework.upload(site, case, placement, "test")
    site.ledger.transition(case.id, CaseState.PENDING, actor="test", message="upload interrupted")
    assert casework.upload(site, case, placement, "test")

    assert [(looked, manifest.reused) for looked, manifest in uploads] == [(False, False), (True, True)]


def test_a_task_that_ended_while_nobody_watched_is_judged_by_its_end_not_timed_out(tmp_path):
    """The job was down past the attempt's deadline (a power cut over a weekend) and its task
    ended by itself meanwhile: the resumed wait takes the task's own end, and the results are
    fetched, instead of calling it a timeout and throwing a finished engine's results away."""
    from datetime import datetime, timedelta, timezone

    site = Site(settings_for(tmp_path, [local_host(tmp_path)], command="mkdir -p output", timeout_hours=1))
    case, _ = site.ledger.register_case(make_case(tmp_path, "case-t"))
    placement = casework.choose_placement(site, case)
    assert casework.upload(site, case, placement, "test")
    attempt = casework.admit_and_submit(site, case, [placement], "test")
    status = site.status(placement.host.name)
    deadline = time.monotonic() + 30
    while not (task := status.snapshot().find(attempt.task_id, attempt.label)).finished:
        assert time.monotonic() < deadline, "the task did not end"
        status.invalidate()
        time.sleep(0.1)

    days_later = datetime.now(timezone.utc) + timedelta(days=2)
    outcome = casework.Waiter(site, case, attempt, "test", clock=lambda: days_later).wait()

    assert outcome.result is AttemptResult.SUCCESS, outcome.message
    assert (outcome.exit_code, outcome.task.id) == (0, task.id)
