"""The rule that tells a pueue daemon restart from a person's hand (mqi.queue.restart).

Times are built the way the pueue client reads them: RFC 3339 in the host's local offset, as
pueue prints them, parsed into aware datetimes.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from mqi.queue.base import DaemonStart, GroupInfo, TaskInfo, TaskResult, TaskState
from mqi.queue.pueue_json import parse_timestamp
from mqi.queue.restart import SHUTDOWN_WINDOW, Cause, GroupSeen, kill_cause, pause_cause

# The daemon started at 12:00:00 UTC; the host prints its times at +09:00 (Seoul).
DAEMON = parse_timestamp("2026-03-01T21:00:00.250+09:00")
HOST_ZONE = timezone(timedelta(hours=9))


def at(seconds: float) -> datetime:
    """`seconds` after the daemon's start, printed as the host prints it (+09:00) and read back."""
    return parse_timestamp((DAEMON + timedelta(seconds=seconds)).astimezone(HOST_ZONE).isoformat())


def killed(task_id: int = 1, *, start: float | None = -600, end: float | None = 0.01) -> TaskInfo:
    return TaskInfo(task_id, f"mqi-c{task_id}-a1", "gpu", TaskState.DONE, TaskResult.KILLED,
                    start=None if start is None else at(start), end=None if end is None else at(end))


def started(task_id: int, start: float) -> TaskInfo:
    return TaskInfo(task_id, "other", "gpu", TaskState.RUNNING, start=at(start))


def test_the_times_are_read_in_the_hosts_offset():
    assert DAEMON == datetime(2026, 3, 1, 12, 0, 0, 250000, tzinfo=UTC)
    assert (DAEMON + timedelta(seconds=1)).astimezone(HOST_ZONE).isoformat() == "2026-03-01T21:00:01.250000+09:00"
    assert at(1) - DAEMON == timedelta(seconds=1)


# -- (a) a killed task ---------------------------------------------------------------------------
@pytest.mark.parametrize("end", [0.01, 0, -0.5, 3600])
def test_a_task_running_across_the_start_was_killed_by_the_restart(end):
    """v4 restores a running task as Killed with the restore time as its end."""
    verdict = kill_cause(killed(start=-600, end=end), DAEMON, [])
    assert verdict.cause is Cause.RESTART and "running when the pueue daemon started again" in verdict.why


def test_a_killed_task_without_an_end_time_was_killed_by_the_restart_even_without_a_start():
    """v3 restores a running task as Done(Killed) and leaves its end unset."""
    assert kill_cause(killed(end=None), None, []).cause is Cause.RESTART
    assert kill_cause(killed(end=None), DAEMON, []).cause is Cause.RESTART


def test_a_task_started_under_the_running_daemon_was_killed_by_someone():
    verdict = kill_cause(killed(start=5, end=60), DAEMON, [])
    assert verdict.cause is Cause.OPERATOR and "under the daemon running since" in verdict.why


def test_without_the_daemons_start_a_kill_with_an_end_is_not_taken_for_a_restart():
    verdict = kill_cause(killed(start=-600, end=0.01), None, [])
    assert verdict.cause is Cause.OPERATOR and "no start of the pueue daemon" in verdict.why


def test_a_task_killed_as_the_daemon_stopped_was_killed_by_the_restart():
    """A graceful stop (SIGTERM at a reboot) kills the tasks, then the host is down a while."""
    stopped = -240  # four minutes of reboot
    others = [killed(2, start=-900, end=stopped + 0.2), started(3, -1200)]
    verdict = kill_cause(killed(start=-600, end=stopped), DAEMON, others)
    assert verdict.cause is Cause.RESTART and "4 min before it started again" in verdict.why


def test_a_task_killed_while_the_daemon_went_on_was_killed_by_someone():
    """After a `pueue kill` the daemon starts the next queued task; a stopping one starts none."""
    verdict = kill_cause(killed(start=-600, end=-240), DAEMON, [started(2, -239.8)])
    assert verdict.cause is Cause.OPERATOR and "task 2 started later" in verdict.why


def test_a_task_killed_long_before_the_start_was_killed_by_someone():
    end = -(SHUTDOWN_WINDOW.total_seconds() + 1)
    verdict = kill_cause(killed(start=end - 600, end=end), DAEMON, [])
    assert verdict.cause is Cause.OPERATOR and "before the daemon started" in verdict.why
    inside = -(SHUTDOWN_WINDOW.total_seconds() - 1)
    assert kill_cause(killed(start=inside - 600, end=inside), DAEMON, []).cause is Cause.RESTART


def test_only_killed_tasks_are_judged():
    done = TaskInfo(1, "l", "gpu", TaskState.DONE, TaskResult.SUCCESS, end=at(1))
    with pytest.raises(ValueError, match="not killed"):
        kill_cause(done, DAEMON, [])


# -- (b) a paused group --------------------------------------------------------------------------
PAUSED = GroupInfo("gpu", paused=True, parallel=1)


def queued(task_id: int, enqueued: float) -> TaskInfo:
    return TaskInfo(task_id, f"mqi-c{task_id}-a1", "gpu", TaskState.QUEUED, enqueued_at=at(enqueued))


def daemon(host_ahead: float = 0.0, call_seconds: float = 0.2) -> DaemonStart:
    """The daemon's start, asked 30 s after it in a call that took `call_seconds`; the host's
    clock `host_ahead` s ahead of ours."""
    middle = at(30) - timedelta(seconds=host_ahead)
    half = timedelta(seconds=call_seconds / 2)
    return DaemonStart(started_at=DAEMON, host_now=at(30), asked_at=middle - half, answered_at=middle + half)


def ours(seconds: float, host_ahead: float = 0.0) -> datetime:
    """A moment `seconds` after the daemon's start, on our clock."""
    return at(seconds) - timedelta(seconds=host_ahead)


def test_a_group_seen_running_before_the_restart_that_held_waiting_tasks_was_paused_by_it():
    verdict = pause_cause(PAUSED, [queued(2, -300)], daemon(), GroupSeen(running_at=ours(-10)))
    assert verdict.cause is Cause.RESTART and "paused it" in verdict.why
    seen_paused_after = GroupSeen(running_at=ours(-10), paused_since=ours(5))
    assert pause_cause(PAUSED, [queued(2, -300)], daemon(), seen_paused_after).cause is Cause.RESTART


def test_a_group_seen_running_after_the_restart_was_paused_by_someone():
    verdict = pause_cause(PAUSED, [queued(2, -300)], daemon(), GroupSeen(running_at=ours(10)))
    assert verdict.cause is Cause.OPERATOR and "paused since by someone" in verdict.why


def test_sightings_within_the_margin_of_the_start_are_no_evidence_of_a_person():
    """Where the daemon's start falls on our clock is known to half the call's time (plus a
    second): a sighting that close to it cannot show a pause before or after the restart."""
    slow = daemon(call_seconds=4.0)  # placed to +-2 s, +1 s slack
    assert pause_cause(PAUSED, [queued(2, -300)], slow, GroupSeen(running_at=ours(2.9))).cause is Cause.RESTART
    assert pause_cause(PAUSED, [queued(2, -300)], slow, GroupSeen(running_at=ours(3.1))).cause is Cause.OPERATOR
    paused_early = GroupSeen(running_at=ours(-60), paused_since=ours(-2.9))
    assert pause_cause(PAUSED, [queued(2, -300)], slow, paused_early).cause is Cause.RESTART
    paused_earlier = GroupSeen(running_at=ours(-60), paused_since=ours(-3.1))
    assert pause_cause(PAUSED, [queued(2, -300)], slow, paused_earlier).cause is Cause.OPERATOR


def test_a_group_already_paused_before_the_restart_was_paused_by_someone():
    seen = GroupSeen(running_at=ours(-600), paused_since=ours(-300))
    verdict = pause_cause(PAUSED, [queued(2, -900)], daemon(), seen)
    assert verdict.cause is Cause.OPERATOR and "already paused" in verdict.why


def test_a_group_where_nothing_waited_at_the_restart_was_paused_by_someone():
    """pueue pauses only groups that hold a queued task when it starts."""
    verdict = pause_cause(PAUSED, [queued(2, 5)], daemon(), GroupSeen(running_at=ours(-10)))
    assert verdict.cause is Cause.OPERATOR and "no task waited" in verdict.why


def test_a_group_never_seen_or_without_the_daemons_start_is_left_to_a_person():
    assert pause_cause(PAUSED, [queued(2, -300)], daemon(), None).cause is Cause.OPERATOR
    assert pause_cause(PAUSED, [queued(2, -300)], daemon(), GroupSeen()).cause is Cause.OPERATOR
    assert pause_cause(PAUSED, [queued(2, -300)], None, GroupSeen(running_at=ours(-10))).cause is Cause.OPERATOR


@pytest.mark.parametrize("host_ahead", [-120.0, 120.0])
def test_what_we_saw_is_compared_on_our_clock_whatever_the_hosts_clock_says(host_ahead):
    """Seen running 10 s before the restart by our clock: the host's clock running two minutes
    ahead or behind must not turn that into 'after' (or the other way round)."""
    before = GroupSeen(running_at=ours(-10, host_ahead))
    after = GroupSeen(running_at=ours(10, host_ahead))
    assert pause_cause(PAUSED, [queued(2, -300)], daemon(host_ahead), before).cause is Cause.RESTART
    assert pause_cause(PAUSED, [queued(2, -300)], daemon(host_ahead), after).cause is Cause.OPERATOR


def test_only_paused_groups_are_judged():
    with pytest.raises(ValueError, match="not paused"):
        pause_cause(GroupInfo("gpu", paused=False, parallel=1), [], daemon(), None)
