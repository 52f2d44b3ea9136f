"""`mqi status` and `mqi show` on a ledger of 10,000 cases, timed as whole commands.

The ledger (SQLite) is filled in bulk: every case completed, with one attempt and five
events. Each command is run as a user runs it, a new `mqi` process, timed by hyperfine when
it is installed, else by repeated subprocess runs: once while `mqi run` runs with the same
settings (it answers them over its socket, `mqi.job_socket`), once with no job running (the
process starts, imports, reads the settings, queries the ledger and lays out the table).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy import insert

from benchmarks.harness import median, timings
from benchmarks.report import Row, Section
from mqi.ledger.models import AttemptRow, CaseRow, EventRow
from mqi.ledger.store import Ledger
from tests.support.cases import mqi_listing_imports

MQI = str(Path(sys.executable).with_name("mqi"))
RUNS = 10
STORY = [(None, "pending"), ("pending", "uploading"), ("uploading", "queued"), ("queued", "running"),
         ("running", "completed")]


def fill(url: str, count: int) -> None:
    start = datetime(2025, 1, 6, tzinfo=UTC)
    with Ledger.open(url) as ledger, ledger.engine.begin() as connection:
        ids = range(1, count + 1)
        moment = {i: start + timedelta(minutes=3 * i) for i in ids}
        connection.execute(insert(CaseRow), [
            dict(id=i, uid=f"c{i:011d}", source=f"/data/inbox/patient_{i:05d}", name=f"patient_{i:05d}",
                 state="completed", progress=100, created_at=moment[i], updated_at=moment[i] + timedelta(hours=1),
                 results_path=f"/data/results/patient_{i:05d}")
            for i in ids
        ])  # fmt: skip
        connection.execute(insert(AttemptRow), [
            dict(id=i, case_id=i, number=1, host=f"gpu{i % 3}", pueue_group=f"gpu{i % 4}", pueue_task_id=i,
                 pueue_label=f"mqi-c{i:011d}-a1", remote_dir=f"/scratch/mqi/c{i:011d}", submitted_at=moment[i],
                 started_at=moment[i], ended_at=moment[i] + timedelta(hours=1), exit_code=0, result="success")
            for i in ids
        ])  # fmt: skip
        connection.execute(insert(EventRow), [
            dict(case_id=i, at=moment[i] + timedelta(minutes=step), from_state=before, to_state=after,
                 attempt_id=None if before is None else i, actor="flow-run/bench", message=f"{after} (bench)")
            for i in ids
            for step, (before, after) in enumerate(STORY)
        ])  # fmt: skip


def time_command(argv: list[str], workdir: Path) -> tuple[float, str]:
    """Median seconds of `argv` as a whole process run in `workdir`, and the tool that measured it."""
    if shutil.which("hyperfine"):
        report = workdir / "hyperfine.json"
        subprocess.run(
            ["hyperfine", "--shell=none", "--warmup", "2", "--runs", str(RUNS), "--export-json", str(report),
             "--style", "none", subprocess.list2cmdline(argv)],
            check=True, capture_output=True, cwd=workdir,
        )  # fmt: skip
        return json.loads(report.read_text())["results"][0]["median"], "hyperfine"
    subprocess.run(argv, check=True, capture_output=True, cwd=workdir)  # warm the page cache
    return median(timings(lambda number: subprocess.run(argv, check=True, capture_output=True, cwd=workdir),
                          RUNS)), "subprocess timing"


@contextmanager
def main_job(config: Path, workdir: Path) -> Iterator[None]:
    """`mqi run` on these settings, in `workdir`, until it answers quick commands; stopped afterwards."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}  # its embedded server
    with open(workdir / "run.log", "wb") as log:
        job = subprocess.Popen([MQI, "--config", str(config), "run"], cwd=workdir, env=env, stdout=log,
                               stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while not answered_by_the_job([MQI, "--config", str(config), "show", "1"], workdir):
            if job.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"mqi run did not come up: {(workdir / 'run.log').read_text()[-2000:]}")
            time.sleep(1)
        yield
    finally:
        job.send_signal(signal.SIGTERM)
        job.wait(120)


def answered_by_the_job(argv: list[str], workdir: Path) -> bool:
    """True when the command's answer came from the job: the process never imported SQLAlchemy."""
    result = mqi_listing_imports(argv[1:], workdir)
    return result.returncode == 0 and "sqlalchemy" not in result.stderr


def in_process(url: str, case: str) -> dict[str, float]:
    """Best of three: the query and the table alone, in a process that has imported everything."""
    from mqi.cli.cases import case_detail, detail_lines, status_lines

    zone = UTC
    with Ledger.open(url) as ledger:
        return {
            "status": best_of(lambda: status_lines(ledger.overview(), zone, datetime.now(UTC))),
            "show": best_of(lambda: detail_lines(case_detail(ledger, case), zone)),
        }


def best_of(work: Callable[[], object], runs: int = 3) -> float:
    return min(timings(lambda number: work(), runs))


def run(root: Path, *, count: int = 10_000) -> Section:
    root.mkdir(parents=True, exist_ok=True)
    url = f"sqlite:///{root / 'ledger.db'}"
    fill(url, count)
    config = root / "mqi.yaml"
    config.write_text(json.dumps({"ledger": {"url": url}, "state_dir": str(root / ".mqi")}))
    python_start, _ = time_command([sys.executable, "-c", "pass"], root)
    imports, _ = time_command([sys.executable, "-c", "import mqi.cli.command_line"], root)
    inside = in_process(url, str(count // 2))
    status_argv, show_argv = [MQI, "--config", str(config), "status"], [MQI, "--config", str(config), "show",
                                                                          str(count // 2)]
    status, tool = time_command(status_argv, root)
    show, _ = time_command(show_argv, root)
    with main_job(config, root):
        status_asked, _ = time_command(status_argv, root)
        show_asked, _ = time_command(show_argv, root)
    rows = [
        Row(f"`mqi status`, {count:,} cases with 5 events each, `mqi run` running", f"{status_asked:.2f} s",
            "at most 1 s", status_asked <= 1.0),
        Row("`mqi show CASE` in the same ledger, `mqi run` running", f"{show_asked:.2f} s", "at most 0.2 s",
            show_asked <= 0.2),
        Row("`mqi status`, no `mqi run` (the command reads the ledger)", f"{status:.2f} s", "at most 1 s",
            status <= 1.0),
        Row("`mqi show CASE`, no `mqi run`", f"{show:.2f} s", "at most 0.2 s", show <= 0.2),
    ]
    notes = [f"Whole commands (a new process each), median of {RUNS} runs by {tool}, SQLite ledger. With `mqi run` "
             "running on the same settings, the command asks it over a local socket (`mqi.job_socket`: it imports "
             "only the standard library) and the job answers from its loaded ledger. With no job, of the whole "
             f"command a bare `python -c pass` takes {python_start * 1000:.0f} ms and `python -c 'import mqi.cli."
             f"command_line'` (settings, SQLAlchemy, typer) {imports * 1000:.0f} ms; the query and the table "
             f"alone, in a warm process, take {inside['status'] * 1000:.0f} ms (status) and "
             f"{inside['show'] * 1000:.1f} ms (show)."]
    return Section("Ledger: reading 10,000 cases", rows, notes)
