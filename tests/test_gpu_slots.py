"""GPU slots: held in the ledger (an atomic check-and-set), shown in Prefect's limits and
repaired from the ledger when Prefect counts otherwise (a server restart, a dead holder)."""

from __future__ import annotations

import threading

import pytest

from mqi.ledger.states import CaseState
from mqi.ledger.store import CaseMovedOn, Ledger
from mqi.site import gpu_limit_name


def uploaded_case(ledger: Ledger, name: str):
    case, _ = ledger.register_case(f"/inbox/{name}")
    return ledger.transition(case.id, CaseState.UPLOADING, actor="test")


def take(ledger: Ledger, case, group: str = "gpu0", capacity: int = 2):
    return ledger.take_slot(case.id, host="h", group=group, capacity=capacity,
                            label_of=lambda n: f"mqi-{case.uid}-a{n}", remote_dir=f"/w/{case.uid}")


def test_slots_are_refused_when_full_and_free_again_once_the_task_has_ended(ledger):
    first, second, third = (uploaded_case(ledger, name) for name in ("a", "b", "c"))

    assert take(ledger, first) is not None and take(ledger, second) is not None
    assert take(ledger, third) is None  # full: the case tries its other groups, then waits
    assert take(ledger, third, group="gpu1") is not None  # another group has room
    assert ledger.slot_holders() == {("h", "gpu0"): 2, ("h", "gpu1"): 1}

    ledger.record_submission(ledger.live_attempt(first.id).id, 7, actor="test", message="added")
    ledger.transition(first.id, CaseState.DOWNLOADING, actor="test")  # the task ended: the GPU is free
    assert ledger.slot_holders() == {("h", "gpu0"): 1, ("h", "gpu1"): 1}
    fourth = uploaded_case(ledger, "d")
    assert take(ledger, fourth) is not None


def test_a_cancelled_case_is_never_admitted(ledger):
    case = uploaded_case(ledger, "a")
    ledger.request_cancel(case.id, actor="test", reason="not needed")

    with pytest.raises(CaseMovedOn):
        take(ledger, case)
    assert ledger.slot_holders() == {}


def test_a_task_added_as_the_cancel_came_is_reported_for_killing(ledger):
    case = uploaded_case(ledger, "a")
    attempt = take(ledger, case)
    ledger.request_cancel(case.id, actor="test", reason="not needed")  # killing: its task may be on its way

    with pytest.raises(CaseMovedOn):
        ledger.record_submission(attempt.id, 12, actor="run", message="added")
    assert ledger.get_attempt(attempt.id).task_id == 12  # kept, so that the kill finds it
    assert ledger.slot_holders() == {("h", "gpu0"): 1}  # held until the kill is confirmed
    assert ledger.confirm_kill(case.id, attempt.id, actor="run", message="killed").state is CaseState.CANCELLED
    assert ledger.slot_holders() == {}


def test_two_processes_never_take_more_slots_than_a_group_has(ledger_url):
    """Admissions from separate connections at once (two worker processes): the group's row lock
    lets one count at a time, on SQLite and on PostgreSQL."""
    with Ledger.open(ledger_url) as setup:
        cases = [uploaded_case(setup, f"case-{i}") for i in range(12)]
    ledgers = [Ledger.open(ledger_url) for _ in range(4)]
    taken = []
    start = threading.Barrier(len(ledgers))

    def admit(ledger: Ledger, mine) -> None:
        start.wait()
        for case in mine:
            if take(ledger, case, capacity=3) is not None:
                taken.append(case.id)

    threads = [threading.Thread(target=admit, args=(ledger, cases[i::4])) for i, ledger in enumerate(ledgers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    try:
        assert len(taken) == 3
        assert ledgers[0].slot_holders() == {("h", "gpu0"): 3}
    finally:
        for ledger in ledgers:
            ledger.close()


def test_prefect_limits_are_repaired_from_the_ledger(prefect_server, tmp_path):
    """What a restart of the Prefect server leaves (slots counted that no lease will ever give
    back) is put right by the next repair, and the limits follow the ledger as slots change."""
    from prefect import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitUpdate

    from tasks.publish import repair_gpu_limits
    from tests.support.cases import local_host, settings_for, start, unique_host, wait_for

    host = local_host(tmp_path, groups=({"name": "gpu0", "slots": 1}, {"name": "gpu1", "slots": 1}))
    host["name"] = unique_host(tmp_path, "slots")
    site = start(settings_for(tmp_path, [host]))
    names = [gpu_limit_name(host["name"], group) for group in ("gpu0", "gpu1")]

    def active_slots() -> list[int]:
        with get_client(sync_client=True) as client:
            return [client.read_global_concurrency_limit_by_name(name).active_slots for name in names]

    with get_client(sync_client=True) as client:  # as a server restart leaves them: both GPUs taken
        for name in names:
            client.update_global_concurrency_limit(name, GlobalConcurrencyLimitUpdate(active_slots=1))
    case, _ = site.ledger.register_case(tmp_path / "inbox" / "a")
    site.ledger.transition(case.id, CaseState.UPLOADING, actor="test")
    site.ledger.take_slot(case.id, host=host["name"], group="gpu1", capacity=1, label_of=str, remote_dir="/w")

    notes = repair_gpu_limits(site)

    assert active_slots() == [0, 1]
    assert len(notes) == 1 and "gpu0" in notes[0]
    site.ledger.request_cancel(case.id, actor="test", reason="done with it")
    site.ledger.confirm_kill(case.id, site.ledger.live_attempt(case.id).id, actor="test", message="killed")
    wait_for(lambda: active_slots() == [0, 0], timeout=30, what="the limit to show the slot given back")


def test_a_slot_change_prefect_did_not_take_is_written_again_until_it_does(prefect_server, tmp_path, caplog):
    """The server refused the write (here: the limit is gone, as after a server whose database
    was lost; a server restarting or busy refuses the same way): the write is tried again until
    it lands, so the limit shows the ledger's count without waiting for the next reconcile."""
    from prefect import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate

    from tests.support.cases import local_host, settings_for, start, unique_host, wait_for
    from tests.support.faults import active_slots

    host = local_host(tmp_path, groups=({"name": "gpu0", "slots": 1},))
    host["name"] = unique_host(tmp_path, "mirror")
    site = start(settings_for(tmp_path, [host]))
    name = gpu_limit_name(host["name"], "gpu0")
    with get_client(sync_client=True) as client:
        client.delete_global_concurrency_limit_by_name(name)
    case, _ = site.ledger.register_case(tmp_path / "inbox" / "a")
    site.ledger.transition(case.id, CaseState.UPLOADING, actor="test")
    site.ledger.take_slot(case.id, host=host["name"], group="gpu0", capacity=1, label_of=str, remote_dir="/w")
    wait_for(lambda: "could not show GPU slots" in caplog.text, timeout=60, what="the write to be refused")

    with get_client(sync_client=True) as client:  # back, but counting nothing (no repair runs here)
        client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1, active_slots=0))
    wait_for(lambda: active_slots(name) == 1, timeout=30, what="the refused write to be made again")
