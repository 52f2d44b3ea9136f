"""SharedStatus: one status call per host per interval, across threads and processes."""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest

from mqi.polling import SharedLogTails, SharedStatus, decode_snapshot, encode_snapshot
from mqi.queue.base import (
    GroupInfo,
    KillOutcome,
    Queue,
    QueueError,
    QueueSnapshot,
    SubmitRequest,
    TaskInfo,
    TaskResult,
    TaskState,
)
from mqi.transport.base import HostUnreachable

SEOUL = timezone(timedelta(hours=9))


def sample_snapshot() -> QueueSnapshot:
    """Every state and every result, times in UTC and in another zone."""
    created = datetime(2026, 3, 1, 9, 30, 15, 123456, tzinfo=UTC)
    tasks = [
        TaskInfo(id=i, label=f"mqi-case{i}-a1", group="gpu0", state=state, command="sh run.sh",
                 path="/work/case", created_at=created, enqueued_at=created.astimezone(SEOUL))
        for i, state in enumerate(s for s in TaskState if s is not TaskState.DONE)
    ]
    first_done = len(tasks)
    tasks += [
        TaskInfo(id=first_done + i, label=None, group="default", state=TaskState.DONE, result=result,
                 exit_code=0 if result is TaskResult.SUCCESS else 3,
                 spawn_error="no such file" if result is TaskResult.FAILED_TO_SPAWN else None,
                 start=created, end=created + timedelta(hours=2, microseconds=7))
        for i, result in enumerate(TaskResult)
    ]
    groups = {"default": GroupInfo("default", paused=False, parallel=1),
              "gpu0": GroupInfo("gpu0", paused=True, parallel=4)}
    return QueueSnapshot(tasks={t.id: t for t in tasks}, groups=groups)


class CountingQueue(Queue):
    """Answers with a fixed snapshot after `delay` seconds; appends one line to `calls_file` per call."""

    def __init__(self, calls_file: Path, delay: float = 0.0, host: str = "gpu-1"):
        self.host = host
        self.calls_file = calls_file
        self.delay = delay
        self.failure: Exception | None = None
        self.log_calls: list[dict[int, str]] = []

    def snapshot(self) -> QueueSnapshot:
        with open(self.calls_file, "a") as calls:
            calls.write(f"{os.getpid()}\n")
        time.sleep(self.delay)
        if self.failure is not None:
            raise self.failure
        return sample_snapshot()

    def calls(self) -> int:
        return len(self.calls_file.read_text().splitlines()) if self.calls_file.exists() else 0

    def submit(self, request: SubmitRequest) -> int:
        raise NotImplementedError

    def kill(self, task_id: int, label: str, *, confirm_timeout: float = 10.0) -> KillOutcome:
        raise NotImplementedError

    def log_tails(self, tasks, lines: int = 15) -> dict[int, str]:
        self.log_calls.append(dict(tasks))
        if self.failure is not None:
            raise self.failure
        return {task_id: f"output of {label}" for task_id, label in tasks.items()}


class FakeClock:
    def __init__(self):
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def queue(tmp_path) -> CountingQueue:
    return CountingQueue(tmp_path / "calls.log")


@pytest.fixture
def cache_dir(tmp_path) -> Path:
    return tmp_path / "status-cache"


def call_from_threads(count: int, status_of_thread) -> list[QueueSnapshot]:
    """Call snapshot() from `count` threads released at the same moment."""
    start = threading.Barrier(count)
    results: list[QueueSnapshot] = []

    def caller(index: int) -> None:
        shared = status_of_thread(index)
        start.wait()
        results.append(shared.snapshot())

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


@pytest.mark.parametrize("callers", [1, 10, 100])
def test_concurrent_threads_share_one_call(queue, cache_dir, callers):
    queue.delay = 0.05
    shared = SharedStatus(queue, cache_dir, max_age=60)
    results = call_from_threads(callers, lambda _: shared)
    assert queue.calls() == 1
    assert len(results) == callers
    assert all(result == sample_snapshot() for result in results)


def test_separate_instances_in_one_process_share_one_call(queue, cache_dir):
    # e.g. two Site objects: they share only the cache folder
    queue.delay = 0.05
    call_from_threads(8, lambda _: SharedStatus(queue, cache_dir, max_age=60))
    assert queue.calls() == 1


def _snapshot_in_another_process(calls_file: Path, cache_dir: Path, start, results) -> None:
    shared = SharedStatus(CountingQueue(calls_file, delay=0.3), cache_dir, max_age=60)
    start.wait()
    results.put(shared.snapshot() == sample_snapshot())


def test_processes_share_one_call(tmp_path, cache_dir):
    calls_file = tmp_path / "calls.log"
    context = multiprocessing.get_context("spawn")  # fresh interpreters, like separate flow runs
    start, results = context.Barrier(4), context.Queue()
    processes = [
        context.Process(target=_snapshot_in_another_process, args=(calls_file, cache_dir, start, results))
        for _ in range(4)
    ]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=60)
    assert [process.exitcode for process in processes] == [0] * 4
    assert [results.get(timeout=5) for _ in processes] == [True] * 4
    assert len(calls_file.read_text().splitlines()) == 1


def test_a_new_call_after_max_age(queue, cache_dir):
    clock = FakeClock()
    shared = SharedStatus(queue, cache_dir, max_age=10, clock=clock)
    shared.snapshot()
    clock.now += 9.9
    shared.snapshot()
    assert queue.calls() == 1
    clock.now += 0.2
    shared.snapshot()
    assert queue.calls() == 2


def test_an_answer_from_another_instance_ages_by_when_it_was_taken(queue, cache_dir):
    clock = FakeClock()
    SharedStatus(queue, cache_dir, max_age=10, clock=clock).snapshot()
    clock.now += 9
    later = SharedStatus(queue, cache_dir, max_age=10, clock=clock)
    later.snapshot()
    assert queue.calls() == 1
    clock.now += 2
    later.snapshot()
    assert queue.calls() == 2


def test_a_clock_set_back_does_not_keep_an_answer_forever(queue, cache_dir):
    clock = FakeClock()
    shared = SharedStatus(queue, cache_dir, max_age=10, clock=clock)
    shared.snapshot()
    clock.now -= 3600
    shared.snapshot()
    assert queue.calls() == 2


def test_errors_propagate_and_are_not_cached(queue, cache_dir):
    shared = SharedStatus(queue, cache_dir, max_age=60)
    queue.failure = QueueError("daemon down")
    for _ in range(2):
        with pytest.raises(QueueError, match="daemon down"):
            shared.snapshot()
    assert queue.calls() == 2
    assert not (cache_dir / "gpu-1.json").exists()
    queue.failure = None
    assert shared.snapshot() == sample_snapshot()
    assert queue.calls() == 3


def test_threads_waiting_on_a_failing_call_get_its_error_without_repeating_it(queue, cache_dir):
    queue.delay = 0.2
    queue.failure = QueueError("host down")
    shared = SharedStatus(queue, cache_dir, max_age=60)
    errors: list[Exception] = []

    def caller() -> None:
        try:
            shared.snapshot()
        except QueueError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=caller) for _ in range(10)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(errors) == 10
    assert queue.calls() == 1


def test_invalidate_makes_the_next_read_fresh_in_every_instance(queue, cache_dir):
    first = SharedStatus(queue, cache_dir, max_age=60)
    other = SharedStatus(queue, cache_dir, max_age=60)
    first.snapshot()
    other.snapshot()
    assert queue.calls() == 1
    first.invalidate()
    other.snapshot()
    first.snapshot()
    assert queue.calls() == 2


def test_a_damaged_cache_file_is_replaced(queue, cache_dir):
    shared = SharedStatus(queue, cache_dir, max_age=60)
    shared.snapshot()
    (cache_dir / "gpu-1.json").write_text('{"format": 1, "tasks": [')
    assert SharedStatus(queue, cache_dir, max_age=60).snapshot() == sample_snapshot()
    assert queue.calls() == 2


def test_cache_of_another_host_is_not_used(tmp_path, cache_dir):
    one = CountingQueue(tmp_path / "one.log", host="gpu-1")
    two = CountingQueue(tmp_path / "two.log", host="gpu-2")
    SharedStatus(one, cache_dir, max_age=60).snapshot()
    SharedStatus(two, cache_dir, max_age=60).snapshot()
    assert (one.calls(), two.calls()) == (1, 1)


def test_snapshot_round_trips_through_the_cache_file(queue, cache_dir):
    original = sample_snapshot()
    SharedStatus(queue, cache_dir, max_age=60).snapshot()
    _, restored = decode_snapshot((cache_dir / "gpu-1.json").read_bytes(), "gpu-1")
    assert restored == original
    for task_id, task in original.tasks.items():
        for when in ("created_at", "enqueued_at", "start", "end"):
            stored = getattr(restored.tasks[task_id], when)
            assert stored == getattr(task, when)
            assert stored is None or stored.utcoffset() == getattr(task, when).utcoffset()
    assert {t.state for t in restored.tasks.values()} == set(TaskState)
    assert {t.result for t in restored.tasks.values()} - {None} == set(TaskResult)
    assert all(type(t.state) is TaskState for t in restored.tasks.values())


def test_a_cache_file_names_its_host():
    data = encode_snapshot(sample_snapshot(), "gpu-1", time.time())
    with pytest.raises(ValueError):
        decode_snapshot(data, "gpu-2")


def test_a_host_name_that_cannot_name_a_file_is_refused(tmp_path):
    with pytest.raises(ValueError, match="cannot name a cache file"):
        SharedStatus(CountingQueue(tmp_path / "c", host="../etc"), tmp_path, max_age=1)


# -- progress: one log read per host for all its running cases ------------------------------


def test_log_tails_of_many_cases_are_one_read_per_interval(queue):
    clock = FakeClock()
    tails = SharedLogTails(queue, max_age=5.0, lines=20, clock=clock)
    for task_id in range(100):
        tails.watch(task_id, f"mqi-c{task_id}-a1")

    start, answers = threading.Barrier(100), {}

    def case_thread(task_id: int) -> None:
        start.wait()
        answers[task_id] = tails.tail(task_id)

    threads = [threading.Thread(target=case_thread, args=(i,)) for i in range(100)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert answers == {i: f"output of mqi-c{i}-a1" for i in range(100)}
    assert len(queue.log_calls) == 1 and len(queue.log_calls[0]) == 100  # one `pueue log 0 1 ... 99`

    clock.now += 4.9
    assert tails.tail(7) == "output of mqi-c7-a1" and len(queue.log_calls) == 1  # still fresh
    clock.now += 0.2
    tails.forget(7)
    assert tails.tail(7) is None  # no longer waited on: not read, not kept
    assert tails.tail(8) == "output of mqi-c8-a1"
    assert len(queue.log_calls) == 2 and 7 not in queue.log_calls[1]


def test_a_failed_log_read_gives_no_progress_and_is_not_repeated_at_once(queue):
    clock = FakeClock()
    tails = SharedLogTails(queue, max_age=5.0, lines=20, clock=clock)
    tails.watch(1, "mqi-c1-a1")
    queue.failure = HostUnreachable("gpu-1", "connection reset")

    assert tails.tail(1) is None and tails.tail(1) is None
    assert len(queue.log_calls) == 1
    queue.failure = None
    clock.now += 5
    assert tails.tail(1) == "output of mqi-c1-a1"


def test_seconds_until_stale_counts_down_from_the_last_answer(queue, cache_dir):
    clock = FakeClock()
    shared = SharedStatus(queue, cache_dir, max_age=10, clock=clock)
    assert shared.seconds_until_stale() == 0.0  # nothing read yet
    shared.snapshot()
    clock.now += 4
    assert shared.seconds_until_stale() == 6
    clock.now += 7
    assert shared.seconds_until_stale() == 0.0
    shared.snapshot()
    shared.invalidate()
    assert shared.seconds_until_stale() == 0.0
