"""`mqi status`, `mqi show` and `mqi db upgrade` on SQLite and PostgreSQL ledgers."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import insert
from typer.testing import CliRunner

from mqi.cli import app
from mqi.cli.cases import (
    age_text,
    case_detail,
    detail_json,
    detail_lines,
    status_json,
    status_lines,
)
from mqi.ledger import AttemptResult, CaseState, FailureCategory, Ledger
from mqi.ledger.models import AttemptRow, CaseRow, EventRow

REPO = Path(__file__).resolve().parents[1]
SEOUL = ZoneInfo("Asia/Seoul")
T0 = datetime(2025, 3, 1, 9, 0, tzinfo=UTC)  # 18:00 in Seoul
STATUS_KEYS = [
    "id",
    "uid",
    "name",
    "state",
    "progress",
    "host",
    "group",
    "task_id",
    "created_at",
    "updated_at",
]


@pytest.fixture(autouse=True)
def no_mqi_environment(monkeypatch):
    for name in list(os.environ):
        if name.startswith("MQI_") and not name.startswith("MQI_TEST_"):
            monkeypatch.delenv(name)


@pytest.fixture
def filled(ledger_url, tmp_path):
    """A ledger with a running case, a failed one retried and completed, and a new one."""
    ticks = iter(T0 + timedelta(minutes=n) for n in range(1000))
    with Ledger.open(ledger_url, clock=lambda: next(ticks)) as ledger:
        running, _ = ledger.register_case(tmp_path / "inbox" / "running_case")
        attempt = ledger.start_attempt(
            running.id, host="gpu1", group="g0", label="l-r", remote_dir="/r"
        )
        ledger.update_attempt(attempt.id, task_id=11)
        for state in ("uploading", "queued", "running"):
            ledger.transition(running.id, state, actor="flow/1", attempt_id=attempt.id)
        ledger.set_progress(running.id, 40)

        retried, _ = ledger.register_case(tmp_path / "inbox" / "retried_case")
        first = ledger.start_attempt(
            retried.id, host="gpu1", group="g0", label="l-1", remote_dir="/r1"
        )
        ledger.update_attempt(first.id, task_id=3)
        ledger.transition(retried.id, "uploading", actor="flow/2", attempt_id=first.id)
        ledger.finish_attempt(first.id, AttemptResult.FAILED, exit_code=2)
        ledger.transition(
            retried.id,
            "failed",
            actor="flow/2",
            attempt_id=first.id,
            failure_category=FailureCategory.ENGINE,
            failure_message="exit 2",
        )
        ledger.transition(retried.id, "pending", actor="operator", message="retry")
        second = ledger.start_attempt(
            retried.id, host="gpu2", group="g1", label="l-2", remote_dir="/r2"
        )
        ledger.update_attempt(second.id, task_id=7)
        for state in ("uploading", "queued", "running"):
            ledger.transition(retried.id, state, actor="flow/3", attempt_id=second.id)
        ledger.finish_attempt(second.id, AttemptResult.SUCCESS, exit_code=0)
        for state in ("downloading", "completed"):
            ledger.transition(retried.id, state, actor="flow/3", attempt_id=second.id)

        ledger.register_case(tmp_path / "inbox" / "new_case")
    return ledger_url


def write_config(tmp_path: Path, ledger_url: str, timezone: str = "Asia/Seoul") -> Path:
    path = tmp_path / "mqi.yaml"
    path.write_text(json.dumps({"ledger": {"url": ledger_url}, "timezone": timezone}))
    return path


def invoke(config: Path, *arguments: str):
    return CliRunner().invoke(app, ["--config", str(config), *arguments])


# -- the plain functions -------------------------------------------------------------


@pytest.mark.parametrize(
    "elapsed, text",
    [
        (timedelta(seconds=45), "45s"),
        (timedelta(minutes=12, seconds=5), "12m"),
        (timedelta(hours=3, minutes=5), "3h05m"),
        (timedelta(days=2, hours=4), "2d04h"),
        (timedelta(seconds=-5), "0s"),
    ],
)
def test_age_text(elapsed, text):
    assert age_text(T0, T0 + elapsed) == text


def test_status_json_has_the_latest_attempt_and_local_times(filled):
    with Ledger.open(filled) as ledger:
        records = status_json(ledger.overview(), SEOUL)

    assert [list(record) for record in records] == [STATUS_KEYS] * 3
    running, retried, new = records
    assert (running["state"], running["progress"], running["host"], running["task_id"]) == (
        "running",
        40,
        "gpu1",
        11,
    )
    assert (retried["state"], retried["host"], retried["group"], retried["task_id"]) == (
        "completed",
        "gpu2",
        "g1",
        7,
    )
    assert (new["state"], new["host"], new["group"], new["task_id"]) == (
        "pending",
        None,
        None,
        None,
    )
    assert running["created_at"] == "2025-03-01T18:00:00+09:00"


def test_status_lines_are_aligned_and_show_where_cases_run(filled):
    with Ledger.open(filled) as ledger:
        lines = status_lines(ledger.overview(), SEOUL, T0 + timedelta(hours=2))

    title, header, *rows = [_plain(line) for line in lines]
    assert title == "3 case(s), times in Asia/Seoul"
    assert header.split() == [
        "id",
        "name",
        "state",
        "progress",
        "host",
        "group",
        "task",
        "age",
        "updated",
    ]
    assert rows[0].split() == [
        "1",
        "running_case",
        "running",
        "40%",
        "gpu1",
        "g0",
        "11",
        "2h00m",
        "03-01",
        "18:05",
    ]
    assert rows[2].split()[:4] == ["3", "new_case", "pending", "0%"]
    state_column = header.index("state")
    assert [row[state_column:].split()[0] for row in rows] == ["running", "completed", "pending"]


def test_detail_has_every_attempt_and_event(filled):
    with Ledger.open(filled) as ledger:
        detail = case_detail(ledger, "2")
    data = detail_json(detail, SEOUL)

    assert data["name"] == "retried_case" and data["state"] == "completed"
    assert [
        (a["host"], a["group"], a["task_id"], a["result"], a["exit_code"]) for a in data["attempts"]
    ] == [
        ("gpu1", "g0", 3, "failed", 2),
        ("gpu2", "g1", 7, "success", 0),
    ]
    transitions = [(e["from"], e["to"]) for e in data["events"]]
    assert transitions[:4] == [
        (None, "pending"),
        ("pending", "uploading"),
        ("uploading", "failed"),
        ("failed", "pending"),
    ]
    assert transitions[-1] == ("downloading", "completed")
    assert data["events"][2]["message"] == "engine: exit 2"
    assert data["events"][0]["at"].endswith("+09:00")
    text = "\n".join(_plain(line) for line in detail_lines(detail, SEOUL))
    assert "engine: exit 2" in text and "gpu2" in text and "retry" in text


def test_show_copes_with_odd_folder_bytes_and_log_tails(ledger_url, tmp_path):
    log_tail = "engine exited 3\nline one\nline two"
    with Ledger.open(ledger_url) as ledger:
        case, _ = ledger.register_case(os.fsencode(tmp_path) + b"/case\xff")
        ledger.transition(
            case.id, "failed", actor="flow", failure_category="engine", failure_message=log_tail
        )
        config = write_config(tmp_path, ledger_url)

    shown = invoke(config, "show", str(case.id))
    as_json = invoke(config, "show", str(case.id), "--json")

    assert shown.exit_code == 0 and as_json.exit_code == 0, shown.output + as_json.output
    assert f"folder:   {tmp_path}/case\ufffd" in shown.output
    assert (
        "failure:  engine: engine exited 3\n            line one\n            line two"
        in shown.output
    )
    assert "engine: engine exited 3 (+2 lines)" in shown.output  # the event, on one line
    assert json.loads(as_json.output)["source"] == f"{tmp_path}/case\ufffd"


# -- the commands ------------------------------------------------------------------


def test_status_command_table_and_json(filled, tmp_path):
    config = write_config(tmp_path, filled)

    table = invoke(config, "status")
    assert table.exit_code == 0, table.output
    assert "running_case" in table.output and "retried_case" in table.output

    as_json = invoke(config, "status", "--json", "--state", "completed")
    assert as_json.exit_code == 0, as_json.output
    [record] = json.loads(as_json.output)
    assert (record["name"], record["host"], record["task_id"]) == ("retried_case", "gpu2", 7)


def test_times_follow_the_configured_timezone(filled, tmp_path):
    config = write_config(tmp_path, filled, timezone="UTC")
    result = invoke(config, "show", "1", "--json")
    assert json.loads(result.output)["created_at"] == "2025-03-01T09:00:00+00:00"


def test_show_command_finds_a_case_by_uid_or_folder(filled, tmp_path):
    config = write_config(tmp_path, filled)
    with Ledger.open(filled) as ledger:
        uid = ledger.get_case(1).uid

    by_uid = invoke(config, "show", uid, "--json")
    by_folder = invoke(config, "show", str(tmp_path / "inbox" / "running_case"), "--json")

    assert by_uid.exit_code == 0, by_uid.output
    assert json.loads(by_uid.output) == json.loads(by_folder.output)
    assert invoke(config, "show", uid).output.startswith(f"case 1  running_case  (uid {uid})")


def test_an_unknown_case_is_one_line_on_stderr_and_exit_1(filled, tmp_path):
    """In a real process: the message, exit code 1, and no traceback."""
    config = write_config(tmp_path, filled)
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            "from mqi.cli import main; main()",
            "--config",
            str(config),
            "show",
            "nope",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert result.stderr.strip() == "error: no case has the id, uid or folder 'nope'"
    assert result.stdout == ""


def test_db_upgrade_creates_then_reports_current(ledger_url, tmp_path):
    config = write_config(tmp_path, ledger_url)

    first = invoke(config, "db", "upgrade")
    again = invoke(config, "db", "upgrade")

    assert first.exit_code == 0, first.output
    assert "upgraded from empty to 0003" in first.output
    assert "already at revision 0003" in again.output


def test_an_unreachable_ledger_is_a_clear_error(tmp_path):
    config = write_config(tmp_path, "postgresql://mqi:CANARY@127.0.0.1:1/mqi?connect_timeout=2")
    result = invoke(config, "status")
    assert result.exit_code == 1
    assert (
        "cannot open the case ledger at postgresql+psycopg://mqi:***@127.0.0.1:1/mqi"
        in result.output
    )
    assert "CANARY" not in result.output


# -- speed -------------------------------------------------------------------------


def test_ten_thousand_cases_list_in_a_second_and_show_in_a_fifth(tmp_path):
    """10,000 cases with 5 events and 2 attempts each (the budget from the issue)."""
    with Ledger.open(f"sqlite:///{tmp_path}/big.db") as ledger:
        _bulk_fill(ledger, 10_000)

        status_seconds = _best_of(3, lambda: status_lines(ledger.overview(), SEOUL, T0))
        json_seconds = _best_of(3, lambda: status_json(ledger.overview(), SEOUL))
        show_seconds = _best_of(3, lambda: detail_lines(case_detail(ledger, "5000"), SEOUL))

    assert status_seconds < 1.0 and json_seconds < 1.0, (status_seconds, json_seconds)
    assert show_seconds < 0.2, show_seconds


def _bulk_fill(ledger: Ledger, count: int) -> None:
    ids = range(1, count + 1)
    with ledger.engine.begin() as connection:
        connection.execute(
            insert(CaseRow),
            [
                dict(
                    uid=f"{i:012d}",
                    source=f"/inbox/case_{i}",
                    name=f"case_{i}",
                    state="completed",
                    progress=100,
                    created_at=T0,
                    updated_at=T0,
                )
                for i in ids
            ],
        )
        connection.execute(
            insert(AttemptRow),
            [
                dict(
                    case_id=i,
                    number=n,
                    host="gpu1",
                    pueue_group="g0",
                    pueue_task_id=i,
                    pueue_label=f"l{i}-{n}",
                    remote_dir="/r",
                    submitted_at=T0,
                    result="success",
                )
                for i in ids
                for n in (1, 2)
            ],
        )
        connection.execute(
            insert(EventRow),
            [
                dict(
                    case_id=i,
                    at=T0,
                    from_state=None,
                    to_state=CaseState.PENDING,
                    actor="scan",
                    message="",
                )
                for i in ids
                for _ in range(5)
            ],
        )


def _best_of(runs: int, work) -> float:
    timings = []
    for _ in range(runs):
        start = time.perf_counter()
        work()
        timings.append(time.perf_counter() - start)
    return min(timings)


def _plain(line: str) -> str:
    """The line without terminal colors."""
    return re.sub(r"\x1b\[[0-9;]*m", "", line)
