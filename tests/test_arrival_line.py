"""The arrival line: cases of one process take GPU slots and submit in arrival order."""

from __future__ import annotations

import threading
import time

from mqi import stopping
from mqi import arrival_line
from mqi.arrival_line import ArrivalGate, ArrivalLine, ExpectedArrivals
from tests.support.cases import wait_for


def run_case(line: ArrivalLine, key: int, free: dict[str, int], groups: list[str], order: list, ready: threading.Event):
    """What gpu_slot does: wait for the turn, try the groups once, hold the turn until submitted."""
    with line.standing(key):
        ready.set()
        while True:
            line.wait_turn(key)
            group = next((g for g in groups if free[g] > 0), None)
            if group is None:
                line.pass_turn(key, found_no_slot=True)
                continue
            free[group] -= 1
            line.step_out(key)
            time.sleep(0.01)  # the submission: nobody else takes a slot meanwhile
            order.append((key, group))
            line.pass_turn(key, found_no_slot=False)
            return


def start(line, key, free, groups, order):
    ready = threading.Event()
    thread = threading.Thread(target=run_case, args=(line, key, free, groups, order, ready), daemon=True)
    thread.start()
    ready.wait(5)
    return thread


def test_cases_that_wait_together_get_slots_in_arrival_order_whoever_asked_first():
    line = ArrivalLine(retry_seconds=0.05)
    free, order = {"gpu0": 0, "gpu1": 0}, []
    threads = [start(line, key, free, ["gpu0", "gpu1"], order) for key in (5, 3, 4, 1, 2)]  # joined out of order
    time.sleep(0.2)
    free["gpu0"], free["gpu1"] = 2, 3  # slots free up
    line.slot_given_back()
    for thread in threads:
        thread.join(5)
    assert [key for key, _ in order] == [1, 2, 3, 4, 5]


def test_a_case_pinned_to_a_full_group_does_not_hold_up_the_cases_behind_it():
    line = ArrivalLine(retry_seconds=0.05)
    free, order = {"gpu0": 0, "gpu1": 1}, []
    pinned = start(line, 1, free, ["gpu0"], order)
    other = start(line, 2, free, ["gpu0", "gpu1"], order)
    other.join(5)
    assert order == [(2, "gpu1")] and pinned.is_alive()
    free["gpu0"] = 1
    line.slot_given_back()
    pinned.join(5)
    assert order == [(2, "gpu1"), (1, "gpu0")]


def test_a_case_that_leaves_without_a_slot_passes_the_turn_on():
    line = ArrivalLine(retry_seconds=0.05)
    with line.standing(1):
        line.wait_turn(1)  # holds the turn, then fails (the server is away) and leaves
    free, order = {"gpu0": 1}, []
    start(line, 2, free, ["gpu0"], order).join(5)
    assert order == [(2, "gpu0")]
    wait_for(lambda: not line._line, what="an empty line")


# -- the upload gate: one at a time, earliest first ----------------------------------------


def test_the_gate_lets_one_through_at_a_time_the_earliest_waiting_first():
    gate, inside, through = ArrivalGate(), [], []
    holder_in, release = threading.Event(), threading.Event()

    def upload(key, hold=None):
        with gate.turn(key):
            inside.append(key)
            assert len(inside) == 1, inside
            through.append(key)
            if hold:
                holder_in.set()
                hold.wait(5)
            time.sleep(0.01)
            inside.remove(key)

    first = threading.Thread(target=upload, args=(9, release))
    first.start()
    holder_in.wait(5)
    later = [threading.Thread(target=upload, args=(key,)) for key in (5, 3, 4, 12)]
    for thread in later:
        thread.start()
        time.sleep(0.02)
    release.set()
    for thread in (first, *later):
        thread.join(5)

    assert through == [9, 3, 4, 5, 12]


def test_a_case_stopped_or_failing_at_the_gate_does_not_block_it():
    gate, done = ArrivalGate(), []
    with gate.turn(1):
        stop = threading.Event()

        def stopped_case():
            stopping.stop_this_thread_with(stop)
            try:
                with gate.turn(2):
                    done.append(2)
            except stopping.MainJobStopping:
                done.append("stopped")

        waiter = threading.Thread(target=stopped_case)
        waiter.start()
        time.sleep(0.05)
        stop.set()
        waiter.join(5)
    try:
        with gate.turn(3):
            raise ValueError("upload failed")
    except ValueError:
        pass
    with gate.turn(4):
        done.append(4)

    assert done == ["stopped", 4]


def test_a_case_started_earlier_goes_first_though_a_later_one_reaches_the_gate_before_it():
    """Case runs started together reach the gate in whatever order their threads get going;
    the gate keeps the turn for the earlier one."""
    expected = ExpectedArrivals()
    gate, through = ArrivalGate(expected), []
    expected.expect(1)
    expected.expect(2)

    def upload(key):
        with gate.turn(key):
            through.append(key)

    later = threading.Thread(target=upload, args=(2,))
    later.start()
    time.sleep(0.3)  # case 2 is at the gate, which is free, and still waits for case 1
    assert through == []
    upload(1)
    later.join(5)

    assert through == [1, 2]


def test_an_earlier_case_that_never_comes_holds_the_gate_only_for_the_grace(monkeypatch):
    monkeypatch.setattr(arrival_line, "EXPECTED_GRACE_SECONDS", 0.4)
    expected = ExpectedArrivals()
    gate = ArrivalGate(expected)
    expected.expect(1)  # say its host is down: it waits for a placement, not at this gate
    started = time.monotonic()
    with gate.turn(2):
        waited = time.monotonic() - started
    assert 0.3 <= waited < 2

    expected = ExpectedArrivals()
    gate = ArrivalGate(expected)
    expected.expect(3)
    expected.arrived(3)  # its run ended before any upload (failed, or resumed past it)
    started = time.monotonic()
    with gate.turn(4):
        assert time.monotonic() - started < 0.3


def test_each_earlier_case_on_its_way_is_waited_for_until_its_own_grace_ends():
    now = [0.0]
    expected = ExpectedArrivals(clock=lambda: now[0])
    expected.expect(1)  # started long ago and held up elsewhere (its host is down)
    now[0] = 100.0
    expected.expect(2)  # started just now, with case 3
    now[0] = 100.5
    assert expected.seconds_to_wait_before(3) == arrival_line.EXPECTED_GRACE_SECONDS - 0.5
    assert expected.seconds_to_wait_before(2) == 0  # only case 1 is earlier, and its grace is over
    assert expected.seconds_to_wait_before(1) == 0
