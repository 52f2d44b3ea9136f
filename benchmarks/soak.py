"""Soak: thousands of short cases through `mqi run`, its memory, threads and open files as it goes.

    .venv/bin/python -m benchmarks soak [--cases 5000] [--quick] [--backlog 20]
        [--sample-seconds 5] [--keep-pueue-tasks] [--scratch DIR] [--out-dir DIR] [--output FILE]

The pipeline benchmark's set-up (benchmarks/pipeline.py): `mqi run` in a child process with
its embedded Prefect server, one host over the lab's real sshd with the pueue stand-in behind
it, two GPU groups of one slot, a case queued ahead on each, a no-op engine command; the Prefect
database is migrated before `mqi run` starts, as every start but a site's first finds it. The SSH
transport, the shared `pueue status` and the upload gates all run in the job as at a site, so
a leak in any of them shows here; a local queue would leave them out.

Cases arrive as a site gets them, a batch at a time: the inbox holds at most `--backlog`
unfinished case folders, topped up by a batch whenever half of them have finished. A
finished case's folder is removed from the inbox and its task from pueue (`pueue remove` of
that one task, as an operator cleans up): the listing the job scans and the `pueue status`
it polls stay the size of the backlog, so what grows over the run is the job's and the
server's own (`--keep-pueue-tasks` leaves the tasks, and every poll reads them all).

Every `--sample-seconds`, from /proc: RSS, PSS and USS (smaps_rollup), threads and open file
descriptors of the `mqi run` process and, summed, of the Prefect server's process tree (its
pid is in state_dir/prefect/server.json), with the cases finished so far. The samples go to
samples.csv in `--out-dir` as they are taken; the curve (a row at every 10 % of the cases)
and the verdict go to curve.md there and to the soak section of benchmarks/RESULTS.md.

Flat after warm-up: the first half of the cases is the warm-up. Between the middle of the run
(samples while 45-55 % of the cases had finished) and its end (the last 10 %), the median RSS
of the job and of the server grows by less than 5 %, and the median thread and open-file
counts of each by at most 10 % (they swing with the case runs alive at the moment). Exits 1
when that fails or a case did not complete.
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import shutil
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path

from benchmarks.harness import Lab, lab, wait_until
from benchmarks.pipeline import API_ERROR, MainJob, descendants, drop_case, ledger_once_created, main_job
from benchmarks.report import Row, Section, machine, plain, section_lines
from mqi.ledger.states import ACTIVE_STATES, CaseState
from mqi.ledger.store import Ledger, folder_key
from mqi.logfile import log_file_path
from mqi.prefect_server import SERVER_LOG

RESULTS = Path(__file__).with_name("RESULTS.md")
OUTPUT_ROOT = Path(__file__).with_name("output")
START_MARK, END_MARK = "<!-- soak:start -->", "<!-- soak:end -->"
FULL_CASES, QUICK_CASES = 5000, 150
MIN_CASES = 20  # fewer leave no samples to compare in the middle and at the end
RSS_GROWTH_LIMIT = 0.05  # of the median RSS at the middle of the run
# Threads and open files swing by half with the case runs alive at the moment of a sample; over
# hundreds of samples the medians hold within a few per cent. A leak of one per 100 cases adds
# 25 over the second half of 5,000.
COUNT_GROWTH_LIMIT = 0.10
MIDDLE, END = (0.45, 0.55), (0.90, 1.00)  # windows of the run, as fractions of the cases finished
FEED_SECONDS = 1.0
PROGRESS_SECONDS = 60.0  # a line on stderr
STALL_SECONDS = 600  # no case finished for this long: the job is stuck, the soak ends
CASE_PREFIX = "soak-"


# -- what a process tree holds ------------------------------------------------------------------


@dataclass(frozen=True)
class Holdings:
    """Memory (MB), threads and open files of one or more processes, summed."""

    processes: int = 0
    rss_mb: float = 0.0  # shared pages are counted once per process
    pss_mb: float = 0.0  # shared pages split between the processes that map them
    uss_mb: float = 0.0  # pages of these processes alone
    threads: int = 0
    fds: int = 0


def holdings(pids: list[int]) -> Holdings:
    """From /proc; a process that ends while it is read counts as gone."""
    total = Holdings()
    for pid in pids:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
            rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
            fds = len(os.listdir(f"/proc/{pid}/fd"))
        except OSError:
            continue
        private = _kb(rollup, "Private_Clean") + _kb(rollup, "Private_Dirty")
        total = Holdings(
            total.processes + 1, total.rss_mb + _kb(status, "VmRSS") / 1024, total.pss_mb + _kb(rollup, "Pss") / 1024,
            total.uss_mb + private / 1024, total.threads + int(_field(status, "Threads") or 0), total.fds + fds,
        )  # fmt: skip
    return total


def _field(text: str, name: str) -> str | None:
    match = re.search(rf"^{name}:\s+(\S+)", text, re.MULTILINE)
    return match.group(1) if match else None


def _kb(text: str, name: str) -> int:
    return int(_field(text, name) or 0)


# -- samples ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    at: str  # UTC
    elapsed_s: float
    load: float  # the machine's 1-minute load average: other work slows the cases
    dropped: int  # case folders that have appeared in the inbox
    finished: int  # completed, failed or cancelled
    failed: int  # failed or cancelled
    job: Holdings  # the `mqi run` process
    server: Holdings  # the Prefect server and every process below it
    others: Holdings  # anything else `mqi run` started


def csv_header() -> list[str]:
    columns = ["at", "elapsed_s", "load", "dropped", "finished", "failed"]
    for part in ("job", "server", "others"):
        columns += [f"{part}_{f.name}" for f in fields(Holdings)]
    return columns


def csv_row(sample: Sample) -> list:
    row = [sample.at, f"{sample.elapsed_s:.1f}", f"{sample.load:.2f}", sample.dropped, sample.finished,
           sample.failed]
    for part in (sample.job, sample.server, sample.others):
        row += [f"{value:.1f}" if isinstance(value, float) else value for value in asdict(part).values()]
    return row


def take_sample(job: MainJob, feed: Feed, started: float) -> Sample:
    main, server = job.process.pid, job.server_pid()
    server_tree = [server, *descendants(server)] if server else []  # a child of `mqi run`, in a session of its own
    others = [pid for pid in descendants(main) if pid not in server_tree]
    return Sample(datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S"), time.monotonic() - started,
                  os.getloadavg()[0], feed.dropped, feed.finished, len(feed.failed), holdings([main]),
                  holdings(server_tree), holdings(others))


# -- feeding the inbox -----------------------------------------------------------------------------


@dataclass
class Feed:
    """Drops cases in batches, follows them in the ledger, clears away the finished ones."""

    job: MainJob
    ledger: Ledger
    total: int
    backlog: int
    remove_tasks: bool
    dropped: int = 0
    finished: int = 0
    last_finish: float = field(default_factory=time.monotonic)
    failed: list[str] = field(default_factory=list)  # "name: state"
    waiting: set[str] = field(default_factory=set)  # dropped, not finished

    @property
    def inbox(self) -> Path:
        return self.job.settings.inbox.path

    def step(self) -> None:
        """One round: collect what finished, then top the inbox up."""
        self.collect_finished()
        if self.dropped < self.total and len(self.waiting) <= self.backlog // 2:
            for _ in range(min(self.backlog - len(self.waiting), self.total - self.dropped)):
                name = f"{CASE_PREFIX}{self.dropped:05d}"
                drop_case(self.job, name)
                self.waiting.add(name)
                self.dropped += 1

    def collect_finished(self) -> None:
        registered = self.ledger.sources()
        active = {case.name for case in self.ledger.cases_in_states(ACTIVE_STATES)}
        done = [name for name in self.waiting if name not in active and folder_key(self.inbox / name) in registered]
        finished_tasks = []
        for name in done:
            case = self.ledger.find_case(str(self.inbox / name))
            if case.state is not CaseState.COMPLETED:
                self.failed.append(f"{name}: {case.state.value}")
            finished_tasks += [str(a.task_id) for a in self.ledger.attempts(case.id) if a.task_id is not None]
            shutil.rmtree(self.inbox / name)
            self.waiting.discard(name)
        if done:
            self.finished += len(done)
            self.last_finish = time.monotonic()
        if finished_tasks and self.remove_tasks:
            removed = self.job.lab.pueue.run("remove", *finished_tasks)
            if removed.returncode != 0:  # housekeeping: the soak goes on, pueue's list grows
                print(f"  pueue remove {' '.join(finished_tasks)}: {removed.stdout}{removed.stderr}",
                      file=sys.stderr, flush=True)


# -- the run ---------------------------------------------------------------------------------------


@dataclass
class Soak:
    cases: int
    samples: list[Sample]
    seconds: float
    failed: list[str]
    api_errors: list[str]  # error lines in the logs of the job and of its server
    reconcile_runs: int


def soak(lab: Lab, cases: int, backlog: int, sample_seconds: float, remove_tasks: bool, csv_path: Path) -> Soak:
    samples: list[Sample] = []
    with (main_job(lab, sample_memory=False, migrate_prefect_first=True) as job,
          open(csv_path, "w", newline="") as csv_file):
        writer = csv.writer(csv_file)
        writer.writerow(csv_header())
        ledger = wait_until(lambda: _alive(job) and ledger_once_created(job.settings), timeout=300,
                            what="the ledger of `mqi run`")
        wait_until(lambda: _alive(job) and job.server_pid(), timeout=300, what="the Prefect server of `mqi run`")
        feed = Feed(job, ledger, cases, backlog, remove_tasks)
        started = next_sample = next_progress = time.monotonic()
        while _alive(job):
            if time.monotonic() >= next_sample or feed.finished == cases:
                samples.append(take_sample(job, feed, started))
                writer.writerow(csv_row(samples[-1]))
                csv_file.flush()  # a soak that dies keeps what it measured
                next_sample = time.monotonic() + sample_seconds
            if time.monotonic() >= next_progress or feed.finished == cases:
                _progress(samples[-1], cases)
                next_progress = time.monotonic() + PROGRESS_SECONDS
            if feed.finished == cases:
                break
            if time.monotonic() - feed.last_finish > STALL_SECONDS:
                raise TimeoutError(f"no case finished for {STALL_SECONDS} s ({feed.finished} of {cases} finished)")
            feed.step()
            time.sleep(FEED_SECONDS)
        return Soak(cases, samples, time.monotonic() - started, feed.failed, api_errors(job), job.reconcile_runs())


def api_errors(job: MainJob) -> list[str]:
    """Prefect API errors in the job's log file and its server's: `mqi run`'s console output repeats
    the job's log, so it is not read as well."""
    lines = []
    for path in (log_file_path(job.settings), job.settings.state_dir / SERVER_LOG):
        if path.exists():
            lines += [line for line in path.read_text(errors="replace").splitlines() if API_ERROR.search(line)]
    return lines


def _alive(job: MainJob) -> bool:
    if job.process.poll() is not None:
        raise RuntimeError(f"`mqi run` exited with {job.process.returncode}")
    return True


def _progress(sample: Sample, cases: int) -> None:
    print(f"  {sample.elapsed_s:6.0f} s  {sample.finished:5d}/{cases} finished  job {sample.job.rss_mb:.0f} MB "
          f"{sample.job.threads} threads {sample.job.fds} fds  server {sample.server.rss_mb:.0f} MB "
          f"{sample.server.threads} threads {sample.server.fds} fds", file=sys.stderr, flush=True)


# -- verdict and curve -----------------------------------------------------------------------------


def window(samples: list[Sample], cases: int, bounds: tuple[float, float]) -> list[Sample]:
    """Samples taken while the finished cases were within `bounds` (fractions of all cases);
    with none in it, the one sample nearest to its middle."""
    low, high = (fraction * cases for fraction in bounds)
    inside = [s for s in samples if low <= s.finished <= high]
    return inside or [min(samples, key=lambda s: abs(s.finished - (low + high) / 2))]


def verdict_rows(result: Soak) -> list[Row]:
    middle, end = window(result.samples, result.cases, MIDDLE), window(result.samples, result.cases, END)
    rows = []
    for part in ("job", "server"):
        name = "`mqi run`" if part == "job" else "its Prefect server (process tree)"
        before, after = (statistics.median(getattr(s, part).rss_mb for s in w) for w in (middle, end))
        growth = after / before - 1 if before else float("inf")
        rows.append(Row(f"RSS of {name}, middle to end", f"{before:.0f} -> {after:.0f} MB ({growth:+.1%})",
                        f"under {RSS_GROWTH_LIMIT:+.0%}", growth < RSS_GROWTH_LIMIT))
        for count in ("threads", "fds"):
            before, after = (statistics.median(getattr(getattr(s, part), count) for s in w) for w in (middle, end))
            label = "threads" if count == "threads" else "open files"
            rows.append(Row(f"{label} of {name}, middle to end", f"{before:g} -> {after:g}",
                            f"at most {COUNT_GROWTH_LIMIT:+.0%}", after <= before * (1 + COUNT_GROWTH_LIMIT)))
    rows.append(Row(f"cases completed of {result.cases:,}", f"{result.cases - len(result.failed):,}",
                    "all", not result.failed))
    # Not part of the verdict: a server on SQLite answers a busy moment with 503, which the job retries.
    rows.append(Row("Prefect API error lines in the logs of the job and its server", str(len(result.api_errors))))
    return rows


def holds(rows: list[Row]) -> bool:
    """The verdict: every row with a target met (the API errors have none)."""
    return all(row.met is not False for row in rows)


def curve(samples: list[Sample], cases: int) -> list[str]:
    """A table row at the start and at every 10 % of the cases: the first sample at or past it."""
    lines = ["| cases finished | time | cases/min since previous row | `mqi run` RSS / PSS MB | threads | fds "
             "| server RSS / PSS MB | threads | fds | load (1 min) |", "|" + " ---: |" * 10]
    previous = None
    for tenth in range(11):
        mark = cases * tenth / 10
        sample = next((s for s in samples if s.finished >= mark), samples[-1])
        if previous is not None and sample is previous:
            continue
        rate = ("" if previous is None or sample.elapsed_s == previous.elapsed_s else
                f"{(sample.finished - previous.finished) / (sample.elapsed_s - previous.elapsed_s) * 60:.1f}")
        job, server = sample.job, sample.server
        lines.append(f"| {sample.finished:,} | {_clock(sample.elapsed_s)} | {rate} "
                     f"| {job.rss_mb:.0f} / {job.pss_mb:.0f} | {job.threads} | {job.fds} "
                     f"| {server.rss_mb:.0f} / {server.pss_mb:.0f} | {server.threads} | {server.fds} "
                     f"| {sample.load:.1f} |")
        previous = sample
    return lines


def _clock(seconds: float) -> str:
    return f"{int(seconds // 3600)}:{int(seconds % 3600 // 60):02d}:{int(seconds % 60):02d}"


def section(result: Soak, backlog: int, sample_seconds: float, remove_tasks: bool) -> Section:
    first, last = result.samples[0], result.samples[-1]
    notes = [
        "`mqi run` as in the pipeline benchmark (two GPU groups of one slot, queue_ahead 1, poll 2 s, no-op engine "
        "command, one host over SSH, SQLite ledger and embedded Prefect server, its database migrated before). "
        f"Cases arrived in batches, at most {backlog} unfinished in the inbox; a finished case's folder left the inbox"
        + (" and its task left pueue (`pueue remove`)." if remove_tasks else "; pueue kept every finished task."),
        f"{result.cases:,} cases in {_clock(result.seconds)}: {result.seconds / result.cases:.2f} s per case, "
        f"{result.cases / result.seconds * 60:.1f} cases per minute on two GPU groups; {result.reconcile_runs} "
        f"reconcile runs. Sampled every {sample_seconds:g} s ({len(result.samples)} samples) from /proc.",
        f"From the first sample (job up, no case yet) to the last: `mqi run` {first.job.rss_mb:.0f} -> "
        f"{last.job.rss_mb:.0f} MB RSS, {first.job.threads} -> {last.job.threads} threads, {first.job.fds} -> "
        f"{last.job.fds} open files; its Prefect server ({last.server.processes} process(es)) "
        f"{first.server.rss_mb:.0f} -> {last.server.rss_mb:.0f} MB, {first.server.threads} -> {last.server.threads} "
        f"threads, {first.server.fds} -> {last.server.fds} open files.",
        f"Flat after warm-up: the first half of the cases is the warm-up; the middle of the run is the samples while "
        f"{MIDDLE[0]:.0%}-{MIDDLE[1]:.0%} of the cases had finished, the end the last {1 - END[0]:.0%}; the figures "
        "compared are the medians of each.",
    ]
    if result.api_errors:
        notes.append(f"First API error line: `{result.api_errors[0][:200].replace('|', '/')}`")
    if result.failed:
        notes.append(f"Not completed: {', '.join(result.failed[:10])}" + (" ..." if len(result.failed) > 10 else ""))
    return Section(f"Soak: {result.cases:,} cases through `mqi run`", verdict_rows(result), notes)


def markdown_block(sect: Section, samples: list[Sample], cases: int, command: str, facts: dict[str, str]) -> str:
    """The soak's section of RESULTS.md, between its markers: it runs on its own, at another time
    than the suite, so it names its own date and load."""
    measured = (f"Measured with `{command}` on {facts['date']}; {facts['cpu']}, {facts['cores']} cores, "
                f"load average at the start {facts['load average at the start (1, 5, 15 min)']}.")
    return "\n".join([START_MARK, *section_lines(sect, (measured,)), *curve(samples, cases), "", END_MARK])


# -- RESULTS.md --------------------------------------------------------------------------------------


def published_block(path: Path) -> str:
    """The soak section of a results file, markers included; '' when it has none."""
    text = path.read_text() if path.exists() else ""
    start, end = text.find(START_MARK), text.find(END_MARK)
    return text[start:end + len(END_MARK)] if 0 <= start < end else ""


def publish(path: Path, block: str) -> None:
    """Replace the soak section of `path` (or add one at its end)."""
    text = path.read_text() if path.exists() else ""
    old = published_block(path)
    path.write_text(text.replace(old, block) if old else text.rstrip("\n") + ("\n\n" if text else "") + block + "\n")


# -- command line ------------------------------------------------------------------------------------


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks soak", description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=None, help=f"default {FULL_CASES:,} ({QUICK_CASES} with --quick)")
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_CASES} cases, not written to RESULTS.md: "
                        "checks that the soak runs (too few cases to be past warm-up)")
    parser.add_argument("--backlog", type=int, default=20, help="unfinished case folders the inbox holds at most")
    parser.add_argument("--sample-seconds", type=float, default=None, help="default 5 (2 with --quick)")
    parser.add_argument("--keep-pueue-tasks", action="store_true", help="leave finished tasks in pueue")
    parser.add_argument("--scratch", type=Path, default=None, help="where temporary servers and data go")
    parser.add_argument("--out-dir", type=Path, default=None, help=f"default {OUTPUT_ROOT}/soak-<UTC time>")
    parser.add_argument("--output", type=Path, default=None, help=f"default {RESULTS} (not written with --quick)")
    args = parser.parse_args(argv)
    cases = args.cases if args.cases is not None else QUICK_CASES if args.quick else FULL_CASES
    sample_seconds = args.sample_seconds or (2.0 if args.quick else 5.0)
    if cases < MIN_CASES:
        parser.error(f"--cases must be at least {MIN_CASES}: the verdict compares the middle of the run with its end")
    if args.backlog < 2:
        parser.error("--backlog must be at least 2: the inbox is topped up when half of it has finished")
    if sample_seconds <= 0:
        parser.error("--sample-seconds must be more than 0")
    out_dir = args.out_dir or OUTPUT_ROOT / f"soak-{datetime.now(UTC):%Y%m%d-%H%M%S}"
    out_dir.mkdir(parents=True, exist_ok=True)
    output = args.output or (None if args.quick else RESULTS)
    command = ("python -m benchmarks soak" + (f" --cases {cases}" if cases != FULL_CASES else "")
               + (" --keep-pueue-tasks" if args.keep_pueue_tasks else ""))

    facts = machine()
    print(f"soak: {cases:,} cases, samples to {out_dir / 'samples.csv'}", file=sys.stderr, flush=True)
    with lab(args.scratch) as servers:
        try:
            result = soak(servers, cases, args.backlog, sample_seconds, not args.keep_pueue_tasks,
                          out_dir / "samples.csv")
        except Exception as error:
            print(f"soak FAILED: {type(error).__name__}: {error} (the job's output and logs in {out_dir})",
                  file=sys.stderr)
            return 1
        finally:  # the lab is deleted on the way out
            _keep_job_output(servers, out_dir)
    sect = section(result, args.backlog, sample_seconds, not args.keep_pueue_tasks)
    block = markdown_block(sect, result.samples, cases, command, facts)
    (out_dir / "curve.md").write_text(block + "\n")
    print(plain([sect]))
    print("\n".join(curve(result.samples, cases)))
    if output is not None:
        publish(output, block)
        print(f"\nwritten to {output}")
    print(f"samples and curve in {out_dir}")
    return 0 if holds(sect.rows) else 1


def _keep_job_output(servers: Lab, out_dir: Path) -> None:
    """`mqi run`'s output and the logs of the job and its server, before the lab goes."""
    base = servers.root / "pipeline"
    for path in [base / "mqi-run.out", *(base / ".mqi").rglob("*.log")]:
        if path.exists():  # not when `mqi run` never started
            shutil.copy(path, out_dir / path.name)
