"""What we last saw of each pueue group, kept in state_dir (mqi.group_sightings)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from mqi.group_sightings import group_records, note_pause_cause, record_seen, sightings_file
from mqi.queue.base import GroupInfo

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def groups(**paused: bool) -> dict[str, GroupInfo]:
    return {name: GroupInfo(name, paused=flag, parallel=1) for name, flag in paused.items()}


def later(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def test_the_last_running_sighting_and_the_first_paused_one_are_kept(tmp_path):
    """Running: when the call was made (the host read it after); paused: when it was answered
    (the host read it before)."""
    for asked, paused in ((0, False), (10, False), (20, True), (30, True)):
        record_seen(tmp_path, "gpu-1", groups(a=paused, b=False), later(asked), later(asked + 1))
    records = group_records(tmp_path, "gpu-1")
    assert (records["a"].running_at, records["a"].paused_since) == (later(10), later(21))
    assert (records["b"].running_at, records["b"].paused_since) == (later(30), None)
    assert records["a"].seen.running_at == later(10)
    assert sightings_file(tmp_path, "gpu-1").parent == tmp_path / "hosts"  # beside the host's health


def test_a_pause_is_announced_once_and_forgotten_when_the_group_runs_again(tmp_path):
    record_seen(tmp_path, "gpu-1", groups(a=False), T0, T0)
    record_seen(tmp_path, "gpu-1", groups(a=True), later(10), later(10))
    assert note_pause_cause(tmp_path, "gpu-1", "a", "paused by a person", later(11)) is True
    assert note_pause_cause(tmp_path, "gpu-1", "a", "paused by a person", later(70)) is False
    assert group_records(tmp_path, "gpu-1")["a"].pause_cause == "paused by a person"

    record_seen(tmp_path, "gpu-1", groups(a=False), later(80), later(80))  # started by the person
    assert group_records(tmp_path, "gpu-1")["a"].pause_cause is None
    record_seen(tmp_path, "gpu-1", groups(a=True), later(90), later(90))  # and paused again: a new pause
    assert note_pause_cause(tmp_path, "gpu-1", "a", "paused by a person", later(91)) is True


def test_a_pause_never_seen_before_is_announced_once_too(tmp_path):
    assert note_pause_cause(tmp_path, "gpu-1", "a", "why", later(1)) is True
    assert note_pause_cause(tmp_path, "gpu-1", "a", "why", later(2)) is False


def test_a_damaged_file_is_as_good_as_none(tmp_path):
    record_seen(tmp_path, "gpu-1", groups(a=False), T0, T0)
    sightings_file(tmp_path, "gpu-1").write_text("{not json")
    assert group_records(tmp_path, "gpu-1") == {}
    record_seen(tmp_path, "gpu-1", groups(a=False), later(5), later(6))
    assert group_records(tmp_path, "gpu-1")["a"].running_at == later(5)
