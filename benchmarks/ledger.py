"""`mqi status` and `mqi show` on a ledger of 10,000 cases, timed as whole commands.

The ledger (SQLite) is filled in bulk: every case completed, with one attempt and five
events. Each command is run as a user runs it, a new `mqi` process (start, imports, reading
the settings, the query, the table), timed by hyperfine when it is installed, else by
repeated subprocess runs.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy import insert

from benchmarks.harness import median, timings
from benchmarks.report import Row, Section
from mqi.ledger.models import AttemptRow, CaseRow, EventRow
from mqi.ledger.store import Ledger

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
    """Median seconds of `argv` as a whole process, and the tool that measured it."""
    if shutil.which("hyperfine"):
        report = workdir / "hyperfine.json"
        subprocess.run(
            ["hyperfine", "--shell=none", "--warmup", "2", "--runs", str(RUNS), "--export-json", str(report),
             "--style", "none", subprocess.list2cmdline(argv)],
            check=True, capture_output=True,
        )  # fmt: skip
        return json.loads(report.read_text())["results"][0]["median"], "hyperfine"
    subprocess.run(argv, check=True, capture_output=True)  # warm the page cache
    return median(timings(lambda number: subprocess.run(argv, check=True, capture_output=True), RUNS)), \
        "subprocess timing"


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
    imports, _ = time_command([sys.executable, "-c", "import mqi.cli"], root)
    inside = in_process(url, str(count // 2))
    status, tool = time_command([MQI, "--config", str(config), "status"], root)
    show, _ = time_command([MQI, "--config", str(config), "show", str(count // 2)], root)
    rows = [
        Row(f"`mqi status`, {count:,} cases with 5 events each", f"{status:.2f} s", "at most 1 s", status <= 1.0),
        Row("`mqi show CASE` in the same ledger", f"{show:.2f} s", "at most 0.2 s", show <= 0.2),
    ]
    notes = [f"Whole commands (a new process each), median of {RUNS} runs by {tool}, SQLite ledger. Of that, "
             f"a bare `python -c pass` takes {python_start * 1000:.0f} ms and `python -c 'import mqi.cli'` "
             f"{imports * 1000:.0f} ms; the query and the table alone, in a warm process, take "
             f"{inside['status'] * 1000:.0f} ms (status) and {inside['show'] * 1000:.1f} ms (show)."]
    return Section("Ledger: reading 10,000 cases", rows, notes)
