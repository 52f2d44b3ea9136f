"""Host health: a host that fails is marked down with its reason, skipped, and retried later."""

from __future__ import annotations

import json
import multiprocessing
from datetime import UTC, datetime, timedelta

import pytest

from mqi.host_health import (
    HostHealth,
    RecheckPolicy,
    health_file,
    host_health,
    reachable_hosts,
    record_host_call,
    record_host_failure,
    record_host_ok,
)
from mqi.transport.base import AuthenticationFailed, CommandTimeout, HostKeyRejected, HostUnreachable

T0 = datetime(2026, 3, 1, 9, 0, tzinfo=UTC)
REFUSED = "host 'gpu-b': cannot connect to 10.0.0.2:22 after 4 attempts: ConnectionRefusedError"


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def test_unknown_hosts_are_assumed_reachable(tmp_path):
    assert host_health(tmp_path, "gpu-a") == HostHealth("gpu-a", reachable=None)
    assert reachable_hosts(tmp_path, ["gpu-a", "gpu-b"]) == {"gpu-a", "gpu-b"}


def test_a_failed_host_is_marked_down_with_its_reason_and_skipped(tmp_path):
    record_host_ok(tmp_path, "gpu-a", now=at(0))
    marked = record_host_failure(tmp_path, "gpu-b", REFUSED, transient=True, now=at(0))

    health = host_health(tmp_path, "gpu-b")
    assert health == marked
    assert (health.reachable, health.reason, health.since, health.last_checked) == (
        False,
        REFUSED,
        at(0),
        at(0),
    )
    assert health.since.tzinfo is UTC or health.since.utcoffset() == timedelta(0)
    assert reachable_hosts(tmp_path, ["gpu-a", "gpu-b", "gpu-c"], now=at(5)) == {"gpu-a", "gpu-c"}


def test_a_down_host_is_retried_after_the_back_off_and_comes_back(tmp_path):
    policy = RecheckPolicy(first_seconds=30, max_seconds=600)
    record_host_failure(tmp_path, "gpu-b", REFUSED, transient=True, now=at(0))
    assert "gpu-b" not in reachable_hosts(tmp_path, ["gpu-b"], now=at(29), policy=policy)
    assert "gpu-b" in reachable_hosts(
        tmp_path, ["gpu-b"], now=at(30), policy=policy
    )  # due for a try

    record_host_ok(tmp_path, "gpu-b", now=at(31))  # the try succeeded
    health = host_health(tmp_path, "gpu-b")
    assert (health.reachable, health.reason, health.since, health.failures) == (
        True,
        None,
        at(31),
        0,
    )
    assert reachable_hosts(tmp_path, ["gpu-b"], now=at(32), policy=policy) == {"gpu-b"}


def test_the_back_off_doubles_with_each_failed_try_up_to_a_ceiling(tmp_path):
    policy = RecheckPolicy(first_seconds=30, max_seconds=100)
    now = 0.0
    intervals = []
    for _ in range(4):
        health = record_host_failure(
            tmp_path, "gpu-b", REFUSED, transient=True, now=at(now), policy=policy
        )
        intervals.append((health.next_check(policy) - at(now)).total_seconds())
        now = (health.next_check(policy) - T0).total_seconds()
    assert intervals == [30, 60, 100, 100]
    assert policy.interval(failures=50_000, transient=True) == timedelta(seconds=100)
    assert host_health(tmp_path, "gpu-b").since == at(0)  # down since the first failure


def test_failures_within_one_window_count_once(tmp_path):
    # many flows find the host down at the same moment: the back-off must not explode
    for second in range(5):
        record_host_failure(tmp_path, "gpu-b", f"try {second}", transient=True, now=at(second))
    health = host_health(tmp_path, "gpu-b")
    assert (health.failures, health.last_checked, health.reason) == (1, at(0), "try 4")


def test_a_failure_a_retry_cannot_fix_waits_the_ceiling(tmp_path):
    policy = RecheckPolicy(first_seconds=30, max_seconds=600)
    error = AuthenticationFailed("gpu-b", "root@gpu-b refused our credentials")
    health = record_host_call(tmp_path, "gpu-b", error, now=at(0)).health
    assert (health.reachable, health.transient) == (False, False)
    assert "refused our credentials" in health.reason
    assert health.next_check(policy) == at(600)


def test_a_host_change_is_news_once_however_many_callers_record_it(tmp_path):
    down = HostUnreachable("gpu-b", "cannot connect to 10.0.0.2:22")
    key_changed = HostKeyRejected("gpu-b", "the host key of 10.0.0.2:22 has CHANGED")
    calls = [
        (0, None),  # first seen: reachable
        (10, down), (11, down), (12, down),  # several cases find it down at once
        (20, key_changed), (21, key_changed),  # it came back with another key: needs an operator
        (700, key_changed),  # still refused when checked again after the back-off
        (800, None), (801, None),  # fixed
    ]  # fmt: skip
    recorded = [record_host_call(tmp_path, "gpu-b", error, now=at(t)) for t, error in calls]
    assert [r.news for r in recorded] == [True, True, False, False, True, False, False, True, False]
    announced = [r.health.condition for r in recorded if r.news]  # what the site's events say
    assert announced == ["reachable", "unreachable", "refused", "reachable"]


def test_only_errors_that_mean_the_host_is_out_of_reach_mark_it(tmp_path):
    slow = CommandTimeout("gpu-a", "'pueue' did not finish within 30 s")
    assert record_host_call(tmp_path, "gpu-a", slow) is None
    assert host_health(tmp_path, "gpu-a").reachable is None
    down = HostUnreachable("gpu-a", "cannot connect")
    assert record_host_call(tmp_path, "gpu-a", down).health.reachable is False


def test_a_damaged_file_counts_as_unknown_and_is_replaced(tmp_path):
    path = health_file(tmp_path, "gpu-a")
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    assert host_health(tmp_path, "gpu-a").reachable is None
    record_host_ok(tmp_path, "gpu-a")
    assert json.loads(path.read_text())["reachable"] is True


def test_host_names_cannot_escape_the_health_folder(tmp_path):
    with pytest.raises(ValueError, match="cannot name a health file"):
        host_health(tmp_path, "../etc/passwd")


def _record_many(state_dir, worker: int, rounds: int) -> None:
    for round_ in range(rounds):
        if (worker + round_) % 2:
            record_host_ok(state_dir, "gpu-a")
        else:
            record_host_failure(state_dir, "gpu-a", f"worker {worker}", transient=True)


def test_processes_recording_at_once_always_leave_a_whole_record(tmp_path):
    record_host_ok(tmp_path, "gpu-a")
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=_record_many, args=(tmp_path, n, 60)) for n in range(4)]
    for worker in workers:
        worker.start()
    readings = []
    while any(worker.is_alive() for worker in workers):
        readings.append(host_health(tmp_path, "gpu-a").reachable)
    for worker in workers:
        worker.join()
        assert worker.exitcode == 0
    assert readings and None not in readings, "a reader saw a missing or partial file"
    assert not list(health_file(tmp_path, "gpu-a").parent.glob("*.tmp"))
