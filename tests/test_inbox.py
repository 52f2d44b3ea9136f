"""InboxScanner on real folders; the clock is faked forward instead of sleeping."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from mqi.inbox import InboxScanner
from mqi.settings import InboxSettings

QUIET = 5.0


class FakeClock:
    """File times are real, so the fake clock is set relative to real times."""

    def __init__(self, now: float):
        self.now = now

    def __call__(self) -> float:
        return self.now


def in_seconds(seconds: float) -> FakeClock:
    return FakeClock(time.time() + seconds)


def settle() -> float:
    """A moment clearly after every change so far (file times use a coarse clock)."""
    time.sleep(0.2)
    return time.time()


@pytest.fixture
def inbox(tmp_path) -> Path:
    path = tmp_path / "inbox"
    path.mkdir()
    return path


def make_case(inbox: Path, name: str, files: dict[str, bytes] | None = None) -> Path:
    folder = inbox / name
    folder.mkdir()
    for relative, content in (files or {"input.dcm": b"plan"}).items():
        (folder / relative).parent.mkdir(parents=True, exist_ok=True)
        (folder / relative).write_bytes(content)
    return folder


def ready_names(inbox: Path, seconds_from_now: float, *, at: float | None = None, marker=None, known=None) -> list[str]:
    """What a fresh scanner (a new process) reports that many seconds from now, or `at` then."""
    settings = InboxSettings(path=inbox, quiet_seconds=QUIET, ready_marker=marker)
    clock = FakeClock(at + seconds_from_now) if at is not None else in_seconds(seconds_from_now)
    scanner = InboxScanner(settings, clock=clock)
    result = scanner.scan(known) if known else scanner.scan()
    assert result.problems == []
    return [folder.name for folder in result.ready]


def test_a_folder_is_ready_once_quiet_for_quiet_seconds(inbox):
    folder = make_case(inbox, "case1")
    assert ready_names(inbox, 1) == []
    assert ready_names(inbox, QUIET + 0.5) == ["case1"]
    settings = InboxSettings(path=inbox, quiet_seconds=QUIET)
    [ready] = InboxScanner(settings, clock=in_seconds(QUIET + 0.5)).scan().ready
    assert ready.path == folder and ready.path.is_absolute()
    assert ready.arrived_at.utcoffset().total_seconds() == 0


def _add(deep: Path) -> None:
    (deep / "new.dat").write_bytes(b"more")


def _append(deep: Path) -> None:
    with open(deep / "dose.bin", "ab") as file:
        file.write(b"more")


def _rename(deep: Path) -> None:
    (deep / "dose.bin").rename(deep / "dose2.bin")


def _delete(deep: Path) -> None:
    (deep / "dose.bin").unlink()


def _chmod(deep: Path) -> None:
    (deep / "dose.bin").chmod(0o600)


@pytest.mark.parametrize("change", [_add, _append, _rename, _delete, _chmod])
def test_a_change_deep_inside_restarts_the_quiet_time(inbox, change):
    make_case(inbox, "case1", {"top.dat": b"x", "beams/b1/dose.bin": b"x"})
    before_change = settle()
    assert ready_names(inbox, QUIET - 0.1, at=before_change) == ["case1"]
    change(inbox / "case1" / "beams" / "b1")
    after_change = time.time()
    assert ready_names(inbox, QUIET - 0.1, at=before_change) == []
    assert ready_names(inbox, QUIET, at=after_change) == ["case1"]


def test_with_a_marker_only_the_marker_counts(inbox):
    case = make_case(inbox, "case1", {"input.dcm": b"x", "still-copying.partial": b""})
    assert ready_names(inbox, 3600, marker="READY") == []
    (case / "READY").touch()
    assert ready_names(inbox, 0, marker="READY") == ["case1"]


def test_changes_within_temporary_files_and_folders_do_not_count(inbox):
    case = make_case(inbox, "case1", {"input.dcm": b"x", "upload.tmp": b"", ".cache/index": b""})
    before_change = settle()
    (case / "upload.tmp").write_bytes(b"growing")
    (case / ".cache" / "index").write_bytes(b"rewritten")
    (case / ".cache" / "more").write_bytes(b"added")
    assert ready_names(inbox, QUIET - 0.1, at=before_change) == ["case1"]


@pytest.mark.parametrize("partial", ["dose.bin.partial", "beams/b1/dose.bin.PARTIAL", "beams.partial/dose.bin"])
def test_a_partial_file_or_folder_means_a_copy_is_in_progress(inbox, partial):
    case = make_case(inbox, "case1", {"input.dcm": b"x", partial: b"half"})
    assert ready_names(inbox, 3600) == []
    in_progress = next(p for p in case.rglob("*") if p.name.lower().endswith(".partial"))
    before_rename = settle()
    in_progress.rename(in_progress.with_name(in_progress.name[: -len(".partial")]))
    after_rename = time.time()
    assert ready_names(inbox, QUIET - 0.1, at=before_rename) == []
    assert ready_names(inbox, QUIET, at=after_rename) == ["case1"]


def test_only_plain_folders_are_cases(inbox, tmp_path):
    for name in ("real", ".staging", "case2.partial", "case3.tmp", "CASE4.TMP"):
        make_case(inbox, name)
    (inbox / "notes.txt").write_text("not a case")
    outside = make_case(tmp_path, "outside")
    (inbox / "linked").symlink_to(outside)
    assert ready_names(inbox, QUIET + 0.5) == ["real"]


def test_a_folder_deleted_before_it_is_complete_yields_nothing(inbox):
    case = make_case(inbox, "case1")
    assert ready_names(inbox, 1) == []
    shutil.rmtree(case)
    assert ready_names(inbox, QUIET + 0.5) == []


def test_a_folder_deleted_while_being_looked_at_yields_nothing(inbox):
    make_case(inbox, "case1", {"a/b/c.dat": b"x"})

    def delete_then_answer(path: Path) -> bool:  # runs after listing, before the look inside
        shutil.rmtree(path)
        return False

    assert ready_names(inbox, QUIET + 0.5, known=delete_then_answer) == []


def test_known_folders_are_not_reported(inbox):
    make_case(inbox, "case1")
    make_case(inbox, "case2")
    registered = {inbox / "case1"}
    assert ready_names(inbox, QUIET + 0.5, known=registered.__contains__) == ["case2"]


ODD_NAMES = ["with space", "quote'\"", "new\nline", "tab\tand\\back", "한글 환자", os.fsdecode(b"latin-\xe9\xff")]


def test_any_folder_name_works(inbox):
    for name in ODD_NAMES:
        make_case(inbox, name, {"sub dir/file\nname": b"x"})
    settings = InboxSettings(path=inbox, quiet_seconds=QUIET)
    result = InboxScanner(settings, clock=in_seconds(QUIET + 0.5)).scan()
    assert sorted(folder.name for folder in result.ready) == sorted(ODD_NAMES)
    assert all(folder.path.is_dir() for folder in result.ready)
    assert os.fsencode(inbox / os.fsdecode(b"latin-\xe9\xff")) in {os.fsencode(f.path) for f in result.ready}


def test_ready_folders_come_in_arrival_order_then_by_name(inbox):
    for name in ("b", "a", "c"):
        make_case(inbox, name)
        time.sleep(0.02)  # more than the kernel's coarse timestamp step
    for index in range(20):  # made within one step, some share a change time
        make_case(inbox, f"batch{19 - index:02}")
    settings = InboxSettings(path=inbox, quiet_seconds=QUIET)
    ready = InboxScanner(settings, clock=in_seconds(QUIET + 0.5)).scan().ready
    names = [folder.name for folder in ready]
    assert names[:3] == ["b", "a", "c"]
    by_change_then_name = sorted(names, key=lambda n: (os.lstat(inbox / n).st_ctime_ns // 1000, os.fsencode(n)))
    assert names == by_change_then_name


def test_an_unreadable_folder_is_a_problem_not_a_crash(inbox, monkeypatch):
    make_case(inbox, "good")
    make_case(inbox, "new\nline", {"secret/plan.dcm": b"x"})
    unreadable = os.path.join(inbox, "new\nline", "secret")
    real_scandir = os.scandir

    # Tests run as root, which no file mode stops: refuse the listing as the kernel would.
    def scandir(path):
        if os.fspath(path) == unreadable:
            raise PermissionError(13, "Permission denied", path)
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    settings = InboxSettings(path=inbox, quiet_seconds=QUIET)
    result = InboxScanner(settings, clock=in_seconds(QUIET + 0.5)).scan()
    assert [folder.name for folder in result.ready] == ["good"]
    [problem] = result.problems
    odd_case = inbox / "new\nline"
    assert problem.path == odd_case
    assert str(problem) == f"{str(odd_case)!r}: cannot read 'secret' inside it: Permission denied"
    assert "\n" not in str(problem)


def test_a_missing_inbox_is_a_problem(tmp_path):
    result = InboxScanner(InboxSettings(path=tmp_path / "nowhere")).scan()
    assert result.ready == []
    assert "cannot read the inbox" in str(result.problems[0])


def test_changes_in_the_future_are_reported_and_wait(inbox):
    make_case(inbox, "case1")
    settings = InboxSettings(path=inbox, quiet_seconds=QUIET)
    result = InboxScanner(settings, clock=in_seconds(-3600)).scan()
    assert result.ready == []
    assert "in the future" in str(result.problems[0])


def test_a_long_lived_scanner_sees_changes_that_a_clock_behind_ours_hides(inbox):
    # Our clock an hour ahead of the file server's: every change looks an hour old.
    case = make_case(inbox, "case1")
    clock = in_seconds(3600)
    scanner = InboxScanner(InboxSettings(path=inbox, quiet_seconds=QUIET), clock=clock)
    assert [f.name for f in scanner.scan().ready] == ["case1"]
    (case / "late.dat").write_bytes(b"still arriving")
    assert scanner.scan().ready == []
    assert ready_names(inbox, 3600) == ["case1"]  # a fresh scanner cannot tell
    clock.now += QUIET
    assert [f.name for f in scanner.scan().ready] == ["case1"]


def test_a_thousand_folders_scan_quickly(inbox):
    for index in range(1000):
        os.makedirs(inbox / f"case{index:04}" / "beams")
        (inbox / f"case{index:04}" / "beams" / "b1.dcm").write_bytes(b"y")
    settings = InboxSettings(path=inbox, quiet_seconds=QUIET)
    scanner = InboxScanner(settings, clock=in_seconds(QUIET + 0.5))
    started = time.perf_counter()
    result = scanner.scan()
    elapsed = time.perf_counter() - started
    assert len(result.ready) == 1000
    assert elapsed < 1.0, f"scan of 1,000 folders took {elapsed:.2f} s"
