"""The main job as a site runs it: `mqi run` in a child process, cases dropped into its inbox.

One `mqi run` (its embedded Prefect server; its inbox scan and every case run as threads of
its own process) works against the lab's sshd and pueue stand-in, with two GPU groups of one slot. Three phases:

- overhead: 20 no-op cases one after another, each from the moment its folder appears in
  the inbox (one rename, ready marker inside) to `completed` in the ledger, less the time
  its pueue task ran;
- idle gap: 50 cases of a 5 s command at once; on each group, the time from one task's end
  to the next task's start, from the pueue stand-in's own records;
- burst: 1,000 case folders at once: time until all are registered, peak memory of what
  `mqi run` started, Prefect API errors in its logs, and the order in which cases start.

Every case folder carries its own `run.sh`, so one configuration serves all phases.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from benchmarks.harness import Lab, make_case, median, wait_until, write_config
from benchmarks.report import Row, Section
from mqi.ledger.records import Case
from mqi.ledger.states import CaseState
from mqi.ledger.store import Ledger
from mqi.logfile import log_file_path
from mqi.prefect_server import SERVER_LOG, SERVER_RECORD, prefect_home
from mqi.settings import Settings

MARKER = "READY"
POLL_SECONDS = 2.0
SCAN_SECONDS = 2.0
GROUPS = {"gpu0": 1, "gpu1": 1}
# One more case per group waits uploaded in pueue, so pueue starts it the moment the GPU frees.
QUEUE_AHEAD = 1
COMMAND = "sh run.sh && mkdir -p output && : > output/done"
STOP_TIMEOUT = 60
STARTUP_MIGRATE_TIMEOUT = 600
MEMORY_TARGET_MB = 500
# An error logged by Prefect's client or server, or an HTTP error status it raised.
API_ERROR = re.compile(r"\| ERROR +\||HTTPStatusError|Service Unavailable")


# -- the child process -------------------------------------------------------------------


@dataclass
class Sample:
    at: float
    main_mb: float  # the `mqi run` process itself
    runs_mb: float  # other processes it started (everything but the Prefect server)
    server_mb: float  # the embedded Prefect server
    run_processes: int


@dataclass
class MainJob:
    lab: Lab
    settings: Settings
    process: subprocess.Popen | None = None
    sample_memory: bool = True  # every 0.5 s, for the peaks of the burst
    samples: list[Sample] = field(default_factory=list)
    _sampling: threading.Event = field(default_factory=threading.Event)

    @property
    def output_file(self) -> Path:
        return self.settings.state_dir.parent / "mqi-run.out"

    def start(self) -> None:
        config = write_config(self.settings, self.settings.state_dir.parent / "mqi.yaml")
        env = _clean_env()
        with open(self.output_file, "ab") as output:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "mqi.cli", "--config", str(config), "run"],
                cwd=config.parent, env=env, stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        if self.sample_memory:
            threading.Thread(target=self._sample, daemon=True).start()

    def migrate_prefect_database(self) -> None:
        """Create the embedded server's database before `mqi run` starts it, as every start but a
        site's first finds it: a first start's migrations alone can outlast the server's startup
        timeout on a busy 2-core host."""
        home = prefect_home(self.settings)
        home.mkdir(parents=True, exist_ok=True)
        upgrade = subprocess.run([sys.executable, "-m", "prefect", "server", "database", "upgrade", "-y"],
                                 env={**_clean_env(), "PREFECT_HOME": str(home)}, stdin=subprocess.DEVNULL,
                                 capture_output=True, text=True, timeout=STARTUP_MIGRATE_TIMEOUT)
        if upgrade.returncode != 0:
            output = (upgrade.stdout + upgrade.stderr)[-2000:]
            raise RuntimeError(f"prefect server database upgrade failed: {output}")

    def stop(self) -> None:
        self._sampling.set()
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGINT)  # Ctrl-C, as in a terminal
        try:
            self.process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        server = self.server_pid()
        if server is not None:  # only left when mqi run had to be killed
            _kill_group(server)

    def server_pid(self) -> int | None:
        try:
            text = (prefect_home(self.settings) / SERVER_RECORD).read_text()
        except OSError:
            return None
        match = re.search(r'"pid": (\d+)', text)
        return int(match.group(1)) if match else None

    def _sample(self) -> None:
        while not self._sampling.wait(0.5):
            if self.process is None or self.process.poll() is not None:
                return
            tree = descendants(self.process.pid)
            server = self.server_pid()
            server_tree = {server, *descendants(server)} if server in tree else set()
            runs = [pid for pid in tree if pid not in server_tree]
            self.samples.append(Sample(
                time.time(), _rss_mb(self.process.pid), sum(map(_rss_mb, runs)), sum(map(_rss_mb, server_tree)),
                sum(1 for pid in runs if _is_python(pid)),
            ))  # fmt: skip

    def peak(self, since: float, until: float) -> Sample:
        window = [s for s in self.samples if since <= s.at <= until] or [Sample(0, 0, 0, 0, 0)]
        return Sample(until, max(s.main_mb for s in window), max(s.runs_mb for s in window),
                      max(s.server_mb for s in window), max(s.run_processes for s in window))

    def reconcile_runs(self) -> int:
        """Reconcile runs so far: each also asks the hosts."""
        return self.output_file.read_text(errors="replace").count("for flow 'reconcile'")

    def api_errors(self) -> list[str]:
        lines = []
        for path in (self.output_file, log_file_path(self.settings), self.settings.state_dir / SERVER_LOG):
            if path.exists():
                lines += [line for line in path.read_text(errors="replace").splitlines() if API_ERROR.search(line)]
        return lines


def _clean_env() -> dict[str, str]:
    """This environment without Prefect's or mqi's settings: the job's come from its config."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MQI_"))}


def descendants(pid: int | None) -> list[int]:
    """Every process below `pid`, read from /proc."""
    if pid is None:
        return []
    parent_of = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent_of[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    found, frontier = [], [pid]
    while frontier:
        parent = frontier.pop()
        kids = [child for child, p in parent_of.items() if p == parent]
        found += kids
        frontier += kids
    return found


def _rss_mb(pid: int) -> float:
    try:
        match = re.search(r"VmRSS:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text())
    except OSError:
        return 0.0
    return int(match.group(1)) / 1024 if match else 0.0


def _is_python(pid: int) -> bool:
    try:
        return "python" in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
    except OSError:
        return False


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@contextmanager
def main_job(lab: Lab, *, sample_memory: bool = True, migrate_prefect_first: bool = False) -> Iterator[MainJob]:
    host = lab.host("pipeline", GROUPS)  # pueue's parallelism per group = its slots
    for group in host["groups"]:
        group["queue_ahead"] = QUEUE_AHEAD
    settings = lab.settings("pipeline", host, inbox={"ready_marker": MARKER, "scan_seconds": SCAN_SECONDS},
                            command=COMMAND, poll_seconds=POLL_SECONDS)
    settings.inbox.path.mkdir(parents=True)
    job = MainJob(lab, settings, sample_memory=sample_memory)
    if migrate_prefect_first:
        job.migrate_prefect_database()
    job.start()
    try:
        yield job
    finally:
        job.stop()


# -- cases -------------------------------------------------------------------------------


def drop_case(job: MainJob, name: str, seconds: float = 0) -> float:
    """A case folder appears in the inbox (one rename); returns when."""
    folder = job.settings.inbox.path / name
    staged = make_case(folder.with_name(name + ".partial"))
    (staged / "run.sh").write_text(f"sleep {seconds}\n" if seconds else ":\n")
    (staged / MARKER).write_text("")
    os.rename(staged, folder)
    return time.time()


def cases_named(ledger: Ledger, prefix: str) -> list[Case]:
    return [case for case in ledger.list_cases() if case.name.startswith(prefix)]


def finished(ledger: Ledger, prefix: str, count: int) -> bool:
    cases = cases_named(ledger, prefix)
    return len(cases) == count and all(c.state in (CaseState.COMPLETED, CaseState.FAILED) for c in cases)


@dataclass
class Timeline:
    """When one case reached each state (ledger) and when its task ran (pueue)."""

    dropped: float
    states: dict[CaseState, float]
    task: tuple[float, float] | None
    group: str


def timeline(job: MainJob, ledger: Ledger, case: Case, dropped: float) -> Timeline:
    states: dict[CaseState, float] = {}
    for event in ledger.events(case.id):
        states.setdefault(event.to_state, _epoch(event.at))
    attempts = ledger.attempts(case.id)
    ran = job.lab.started_and_ended()
    return Timeline(dropped, states, ran.get(attempts[-1].label) if attempts else None,
                    attempts[-1].group if attempts else "")


def _epoch(moment: datetime) -> float:
    return moment.timestamp()


# -- phases ------------------------------------------------------------------------------


def overhead_phase(job: MainJob, ledger: Ledger, count: int) -> tuple[list[Row], list[str]]:
    lines = []
    for number in range(count):
        name = f"overhead-{number:02d}"
        dropped = drop_case(job, name)
        wait_until(lambda: finished(ledger, name, 1), timeout=300, what=f"case {name}", every=0.05)
        lines.append(timeline(job, ledger, ledger.find_case(str(job.settings.inbox.path / name)), dropped))
    overheads = [t.states[CaseState.COMPLETED] - t.dropped - (t.task[1] - t.task[0]) for t in lines]
    steps = {
        "inbox to registered": [t.states[CaseState.PENDING] - t.dropped for t in lines],
        "registered to flow run uploading": [t.states[CaseState.UPLOADING] - t.states[CaseState.PENDING] for t in lines],
        "upload and submit": [t.states[CaseState.QUEUED] - t.states[CaseState.UPLOADING] for t in lines],
        "submitted to task start": [t.task[0] - t.states[CaseState.QUEUED] for t in lines],
        "task end to completed": [t.states[CaseState.COMPLETED] - t.task[1] for t in lines],
    }
    target = POLL_SECONDS + 2
    row = Row(f"overhead per case (median of {count}; max {max(overheads):.1f} s)", f"{median(overheads):.1f} s",
              f"at most {target:g} s (poll {POLL_SECONDS:g} s + 2 s)", median(overheads) <= target)
    note = "Overhead per case, medians of its parts: " + "; ".join(
        f"{step} {median(values):.2f} s" for step, values in steps.items()) + "."
    return [row], [note]


def idle_gap_phase(job: MainJob, ledger: Ledger, count: int, seconds: float) -> tuple[list[Row], list[str]]:
    dropped = {f"gap-{n:02d}": drop_case(job, f"gap-{n:02d}", seconds) for n in range(count)}
    wait_until(lambda: finished(ledger, "gap-", count), timeout=120 + count * (seconds + 30), what="the idle-gap cases")
    lines = [timeline(job, ledger, case, dropped[case.name]) for case in cases_named(ledger, "gap-")]
    gaps, launch_waits = [], []
    for group in GROUPS:
        ran = sorted((t for t in lines if t.group == group and t.task), key=lambda t: t.task[0])
        for before, after in zip(ran, ran[1:]):
            gaps.append(after.task[0] - before.task[1])
            launch_waits.append(after.states[CaseState.UPLOADING] - before.task[1])
    row = Row(f"GPU idle gap between cases on one group ({count} cases of {seconds:g} s, 2 groups; "
              f"max {max(gaps):.1f} s)", f"{median(gaps):.1f} s median", "median at most 1 s", median(gaps) <= 1.0)
    total = max(t.states[CaseState.COMPLETED] for t in lines) - min(dropped.values())
    note = (f"Idle gap: {len(gaps)} gaps; the next case began uploading a median "
            f"{median(launch_waits):.1f} s after the previous task ended (negative: it was uploaded and "
            f"queued in pueue before). {count} cases took {total:.0f} s, against "
            f"{count * seconds / len(GROUPS):.0f} s of GPU time per group.")
    return [row], [note]


def burst_phase(job: MainJob, ledger: Ledger, count: int, observe: float) -> tuple[list[Row], list[str]]:
    inbox = job.settings.inbox.path
    staged = []
    for number in range(count):
        folder = make_case(inbox / f"burst-{number:04d}.partial")
        (folder / "run.sh").write_text(":\n")
        (folder / MARKER).write_text("")
        staged.append(folder)
    errors_before = len(job.api_errors())
    started = time.time()
    for folder in staged:
        os.rename(folder, folder.with_name(folder.name.removesuffix(".partial")))
    appeared = time.time() - started
    wait_until(lambda: len(cases_named(ledger, "burst-")) == count, timeout=600, what="the burst to be registered")
    registered = time.time() - started
    time.sleep(observe)
    peak = job.peak(started, time.time())
    errors = job.api_errors()[errors_before:]
    labels = {attempt.label: case.name for case in cases_named(ledger, "burst-")
              for attempt in ledger.attempts(case.id)}
    starts = _first_starts(job)
    started = sorted(labels.keys() & starts.keys(), key=lambda label: starts[label][0])
    # pueue numbers tasks in the order they were added: the order cases reached the GPU queues
    submitted = _inversions([labels[label] for label in sorted(started, key=lambda label: starts[label][1])])
    within_groups = sum(_inversions([labels[label] for label in started if starts[label][2] == group])
                        for group in GROUPS)
    ended = len(labels.keys() & job.lab.started_and_ended().keys())
    orchestrator_mb = peak.main_mb + peak.runs_mb  # the Prefect server is a service of its own at a site
    rows = [
        Row(f"burst of {count:,} folders: all registered", f"{registered:.1f} s", "at most 60 s", registered <= 60),
        Row("burst: peak memory of the orchestrator (`mqi run` and any process it started)",
            f"{orchestrator_mb:.0f} MB ({peak.main_mb:.0f} main + {peak.runs_mb:.0f} others; "
            f"embedded Prefect server {peak.server_mb:.0f} MB more)", f"at most {MEMORY_TARGET_MB} MB",
            orchestrator_mb <= MEMORY_TARGET_MB),
        Row("burst: Prefect API errors in the logs", f"{len(errors)} (whole run: {len(job.api_errors())})", "none",
            not errors),
        Row(f"burst: cases submitted, and started in each group, in arrival order (first {len(started)} "
            f"starts, {observe:.0f} s)", f"{submitted} / {within_groups} out of order", "in arrival order",
            bool(started) and submitted == 0 and within_groups == 0),
    ]
    concurrent = max(job.lab.pueue.max_concurrent(group) for group in GROUPS)
    notes = [f"Burst: the {count:,} folders appeared (renamed into the inbox) within {appeared:.1f} s. Peak Python "
             f"processes besides `mqi run` and its server: {peak.run_processes}; peak pueue tasks at once per group: {concurrent}; "
             f"{ended} burst tasks had finished when we stopped watching. Order is judged by pueue's task ids (the "
             "order tasks were added) and by start times within each group: with a case queued ahead on each "
             "group, a case queued on one GPU may start after a later case queued on the other if that GPU "
             "frees first, as two independent queues do."]
    if errors:
        notes.append(f"Burst: first API error line: `{errors[0][:200].replace('|', '/')}`")
    return rows, notes


def _first_starts(job: MainJob) -> dict[str, tuple[float, int, str]]:
    """When each task first started, its pueue id and its group, by label."""
    starts: dict[str, tuple[float, int, str]] = {}
    for record in job.lab.pueue.task_history():
        if record["event"] == "start":
            starts.setdefault(record["label"], (record["time"], record["id"], record["group"]))
    return starts


def _inversions(names: list[str]) -> int:
    """Neighbours out of arrival order (case names are numbered in arrival order)."""
    return sum(1 for a, b in zip(names, names[1:]) if a > b)


def run(lab: Lab, *, overhead_cases: int = 20, gap_cases: int = 50, gap_seconds: float = 5.0,
        burst_cases: int = 1000, burst_observe: float = 60.0) -> Section:
    rows, notes = [], []
    with main_job(lab) as job:
        ledger = wait_until(lambda: ledger_once_created(job.settings), timeout=120, what="the ledger")
        start = time.time()
        drop_case(job, "warmup")
        wait_until(lambda: finished(ledger, "warmup", 1), timeout=300, what="the warm-up case")
        notes.append(f"`mqi run` started and completed a first case in {time.time() - start:.0f} s (not counted).")
        logins_before = lab.sshd.logins()
        for phase in (
            lambda: overhead_phase(job, ledger, overhead_cases),
            lambda: idle_gap_phase(job, ledger, gap_cases, gap_seconds),
        ):
            phase_rows, phase_notes = phase()
            rows += phase_rows
            notes += phase_notes
        cases = overhead_cases + gap_cases
        logins = lab.sshd.logins() - logins_before
        rows.append(Row(f"SSH connections under `mqi run`: {cases} cases and {job.reconcile_runs()} reconcile runs "
                        "(sshd log)", str(logins), "1 per host per process (one process)", logins <= 1))
        burst_rows, burst_notes = burst_phase(job, ledger, burst_cases, burst_observe)
        rows += burst_rows
        notes += burst_notes
    notes.insert(0, f"`mqi run` with poll {POLL_SECONDS:g} s, scan-inbox every {SCAN_SECONDS:g} s, ready marker "
                    f"`{MARKER}`, groups {GROUPS} (queue_ahead {QUEUE_AHEAD}) on one host over SSH; SQLite ledger and embedded Prefect server "
                    "(SQLite).")
    return Section("The main job (`mqi run`): overhead, GPU idle gap, burst", rows, notes)


def ledger_once_created(settings: Settings) -> Ledger | None:
    """The job's ledger once `mqi run` has created it."""
    try:
        ledger = Ledger.open(settings.ledger.url.get_secret_value(), migrate=False)
        ledger.list_cases()
    except Exception:  # not created or not migrated yet
        return None
    return ledger
