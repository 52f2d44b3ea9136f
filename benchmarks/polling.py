"""Cases waiting on one host: remote calls per poll interval, SSH connections, cost of a poll.

1, 10 and 100 cases go through the steps of `mqi.casework` in threads of this process (the
plain-Python layer under the process-case flow: upload, submit, wait, download), all on one
host, in one pueue group with a slot for each, so all of them run at once. Their command
blocks on a shared file lock that the benchmark holds, so every case is waiting for as long
as we count. Calls are counted at the pueue stand-in (`calls()`: one record per client
invocation on the host); connections by our transport and at sshd's log.
"""

from __future__ import annotations

import fcntl
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from benchmarks.harness import Lab, make_case, median, wait_until
from benchmarks.report import Row, Section
from mqi import casework
from mqi.ledger.states import CaseState
from mqi.queue.base import SubmitRequest
from mqi.queue.pueue import PueueQueue
from mqi.queue.pueue_json import parse_status
from mqi.site import PROGRESS_EVERY_POLLS, PROGRESS_MIN_SECONDS, Site
from mqi.transport.base import Transport
from mqi.transport.local import LocalTransport
from mqi.transport.ssh import SshTransport

ACTOR = "benchmark"
POLL_SECONDS = 1.0
COUNTED_INTERVALS = 10
GROUP = "gpu0"


def one_host_run(lab: Lab, cases: int) -> dict[str, float]:
    """Run `cases` cases at once on one host; calls per interval while all of them wait."""
    gate = lab.root / f"gate-{cases}"
    gate.write_text("")
    command = f"flock -s {gate} true && mkdir -p output && : > output/done"
    host = lab.host(f"wait{cases}", {f"{GROUP}-{cases}": cases})
    site = Site(lab.settings(f"wait-{cases}", host, command=command, poll_seconds=POLL_SECONDS))
    folders = [make_case(site.settings.inbox.path / f"case-{n:03d}") for n in range(cases)]
    logins_before = lab.sshd.logins()
    with ThreadPoolExecutor(max_workers=cases) as pool:
        with open(gate) as held:  # closed before the pool waits for its threads, even on an error
            fcntl.flock(held, fcntl.LOCK_EX)  # the cases' commands wait until we let go
            runs = [pool.submit(process, site, folder) for folder in folders]
            wait_until(lambda: all_running(site, cases), timeout=60 + cases, what=f"{cases} cases to run")
            window_start = time.time()
            time.sleep(COUNTED_INTERVALS * POLL_SECONDS)
            window_end = time.time()
        states = [run.result(timeout=120) for run in runs]
    if states != [CaseState.COMPLETED] * cases:
        raise RuntimeError(f"not every case completed: {states}")
    calls = [c for c in lab.pueue.calls() if window_start <= c["time"] < window_end]
    status = sum(1 for c in calls if "status" in c["argv"])
    transport = site.transport(host["name"])
    return {
        "status per interval": status / COUNTED_INTERVALS,
        "other per interval": (len(calls) - status) / COUNTED_INTERVALS,
        "connections": transport.connections_opened,
        "sshd logins": lab.sshd.logins() - logins_before,
    }


def process(site: Site, folder: Path) -> CaseState:
    """One case's story without Prefect: the steps the process-case flow calls, in order."""
    case, _ = site.ledger.register_case(folder, actor=ACTOR)
    placement = casework.choose_placement(site, case)
    casework.upload(site, case, placement, ACTOR)
    attempt = casework.admit_and_submit(site, case, [placement], ACTOR)
    casework.wait_for(site, case, attempt, ACTOR)
    casework.fetch_results(site, case, site.ledger.live_attempt(case.id), ACTOR)
    return site.ledger.get_case(case.id).state


def all_running(site: Site, cases: int) -> bool:
    return len(site.ledger.list_cases(CaseState.RUNNING)) == cases


# -- the cost of one poll ------------------------------------------------------------------


def poll_cost(lab: Lab, tasks: int, polls: int) -> dict[str, float]:
    """Bytes, parse time and time per `pueue status` with `tasks` tasks on the host."""
    group = "poll-cost"
    lab.pueue.add_group(group, 4)
    workdir = lab.root / "poll-cost"
    workdir.mkdir()
    setup = PueueQueue(LocalTransport("setup"), pueue=str(lab.pueue.bin))
    for number in range(tasks):
        setup.submit(SubmitRequest(label=f"mqi-case{number:04d}-a1", group=group, workdir=str(workdir),
                                   command="sleep 600", env={"CUDA_VISIBLE_DEVICES": str(number % 4)}))
    ssh = SshTransport(**lab.sshd.transport_params("poll-cost"))
    try:
        figures = {"ssh ms": timed_polls(lab, ssh, polls), "local ms": timed_polls(lab, LocalTransport("poll"), polls)}
    finally:
        ssh.close()
    output = lab.pueue.run("status", "--json").stdout
    parse_ms = []
    for _ in range(polls):
        started = time.perf_counter()
        parse_status(output, "bench-host")
        parse_ms.append((time.perf_counter() - started) * 1000)
    return figures | {"bytes": len(output.encode()), "parse ms": statistics.median(parse_ms)}


def timed_polls(lab: Lab, transport: Transport, polls: int) -> float:
    queue = PueueQueue(transport, pueue=str(lab.pueue.bin))
    queue.snapshot()  # opens the connection: a poller keeps it open between polls
    poll_ms = []
    for _ in range(polls):
        started = time.perf_counter()
        queue.snapshot()
        poll_ms.append((time.perf_counter() - started) * 1000)
    return median(poll_ms)


def run(lab: Lab, *, counts: tuple[int, ...] = (1, 10, 100), tasks: int = 200, polls: int = 20) -> Section:
    results = {cases: one_host_run(lab, cases) for cases in counts}
    rows = [
        Row(f"remote calls per poll interval, {cases} case(s) waiting on one host",
            f"{r['status per interval']:.1f} `pueue status` + {r['other per interval']:.1f} other",
            "1 `pueue status` per host per interval, none per case",
            r["status per interval"] <= 1.0 and r["other per interval"] <= 1.0)
        for cases, r in results.items()
    ]
    most = max(counts)
    rows.append(Row(f"SSH connections for {most} cases on one host (one process)",
                    f"{results[most]['connections']} (transport), {results[most]['sshd logins']} (sshd log)",
                    "1 per host per process", results[most]["sshd logins"] == 1))
    cost = poll_cost(lab, tasks, polls)
    rows.append(Row(f"one `pueue status` of {tasks} tasks: time (ssh / local), bytes, parse",
                    f"{cost['ssh ms']:.0f} ms / {cost['local ms']:.0f} ms, {cost['bytes']:,} B, "
                    f"{cost['parse ms']:.1f} ms"))
    notes = [
        f"Poll interval {POLL_SECONDS:g} s; calls counted over {COUNTED_INTERVALS} intervals once every case "
        "was running. 'Other' calls are `pueue log` reads for the progress of running cases: one per host for "
        f"all of its running cases (`mqi.polling.SharedLogTails`), every {PROGRESS_EVERY_POLLS} polls and at most "
        f"every {PROGRESS_MIN_SECONDS:g} s.",
        "Cases run as threads of one process through `mqi.casework` (the steps the process-case flow calls), "
        "as under `mqi run`, so one shared status per host (`mqi.polling.SharedStatus`) serves them all.",
    ]
    return Section("Remote calls and connections while cases wait", rows, notes)
