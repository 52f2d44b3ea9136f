"""`mqi status`, `mqi show CASE` and `mqi db upgrade`: reading the case ledger.

The functions that query and format are plain (tested on their own); the typer commands
at the bottom only open the ledger and print.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, tzinfo
from typing import Annotated, Any

import typer
from rich.cells import cell_len

from mqi.cli.command_line import app, current_settings, db_app
from mqi.ledger import Attempt, Case, CaseOverview, CaseState, Event, Ledger, LedgerError
from mqi.ledger.store import display_text
from mqi.timefmt import local_iso, local_text


@dataclass(frozen=True)
class CaseDetail:
    case: Case
    attempts: list[Attempt]
    events: list[Event]


def case_detail(ledger: Ledger, ref: str) -> CaseDetail:
    """A case (by id, uid or folder) with all its attempts and events."""
    case = ledger.find_case(ref)
    return CaseDetail(case, ledger.attempts(case.id), ledger.events(case.id))


def age_text(since: datetime, now: datetime) -> str:
    """A short duration such as 45s, 12m, 3h05m or 2d04h."""
    seconds = max(0, int((now - since).total_seconds()))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, seconds = divmod(rest, 60)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m" if minutes else f"{seconds}s"


def case_json(case: Case, latest: Attempt | None, zone: tzinfo) -> dict[str, Any]:
    """The keys of a case in `mqi status --json`; host, group and task id of its latest attempt."""
    return overview_json(CaseOverview(
        case.id, case.uid, case.name, case.state, case.progress, case.created_at, case.updated_at,
        latest and latest.host, latest and latest.group, latest and latest.task_id,
    ), zone)


def overview_json(o: CaseOverview, zone: tzinfo) -> dict[str, Any]:
    return {
        "id": o.id,
        "uid": o.uid,
        "name": o.name,
        "state": o.state.value,
        "progress": o.progress,
        "host": o.host,
        "group": o.group,
        "task_id": o.task_id,
        "created_at": local_iso(o.created_at, zone),
        "updated_at": local_iso(o.updated_at, zone),
    }


def status_json(overviews: list[CaseOverview], zone: tzinfo) -> list[dict[str, Any]]:
    return [overview_json(o, zone) for o in overviews]


def status_lines(overviews: list[CaseOverview], zone: tzinfo, now: datetime) -> list[str]:
    """The status table as aligned text lines, title first."""
    rows = [
        (
            str(o.id),
            o.name,
            o.state,
            f"{o.progress}%",
            o.host or "",
            o.group or "",
            "" if o.task_id is None else str(o.task_id),
            age_text(o.created_at, now),
            local_text(o.updated_at, zone, "%m-%d %H:%M"),
        )
        for o in overviews
    ]
    header = ("id", "name", "state", "progress", "host", "group", "task", "age", "updated")
    return [f"{len(overviews)} case(s), times in {zone}", *aligned(header, rows)]


_NUMBER_COLUMNS = {"id", "#", "progress", "task", "attempt", "exit"}
_STATE_COLORS = {
    CaseState.COMPLETED: "green",
    CaseState.FAILED: "red",
    CaseState.CANCELLED: "yellow",
    CaseState.KILLING: "yellow",
    CaseState.RUNNING: "cyan",
}


def aligned(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    """A plain text table: a bold header, then one line per row, numbers right-aligned.

    Rich's Table needs about 0.6 ms a row, 6 s for 10,000 cases; this takes a few ms.
    Case states are colored (click drops the colors when output is not a terminal).
    """
    widths = [max([width_of(h), *(width_of(row[i]) for row in rows)]) for i, h in enumerate(header)]

    def line(cells: tuple[str, ...]) -> str:
        padded = []
        for name, cell, width in zip(header, cells, widths, strict=True):
            fill = " " * (width - width_of(cell))
            text = fill + cell if name in _NUMBER_COLUMNS else cell + fill
            color = _STATE_COLORS.get(cell) if isinstance(cell, CaseState) else None
            padded.append(typer.style(text, fg=color) if color else text)
        return "  ".join(padded).rstrip()

    return [typer.style(line(header), bold=True), *(line(row) for row in rows)]


def width_of(text: str) -> int:
    """Columns on a terminal: wide characters (Korean names) take two."""
    return len(text) if text.isascii() else cell_len(text)


def detail_json(detail: CaseDetail, zone: tzinfo) -> dict[str, Any]:
    """`mqi show --json`: the case keys, then its attempts and events."""
    case = detail.case
    numbers = {attempt.id: attempt.number for attempt in detail.attempts}
    return {
        **case_json(case, detail.attempts[-1] if detail.attempts else None, zone),
        "source": display_text(case.source),
        "failure_category": case.failure_category and case.failure_category.value,
        "failure_message": case.failure_message,
        "results_path": case.results_path and display_text(case.results_path),
        "pinned_host": case.pinned_host,
        "pinned_group": case.pinned_group,
        "attempts": [_attempt_json(attempt, zone) for attempt in detail.attempts],
        "events": [
            {
                "at": local_iso(event.at, zone),
                "from": event.from_state and event.from_state.value,
                "to": event.to_state.value,
                "actor": event.actor,
                "attempt": numbers.get(event.attempt_id),
                "message": event.message,
            }
            for event in detail.events
        ],
    }


def _attempt_json(attempt: Attempt, zone: tzinfo) -> dict[str, Any]:
    return {
        "number": attempt.number,
        "host": attempt.host,
        "group": attempt.group,
        "task_id": attempt.task_id,
        "label": attempt.label,
        "remote_dir": attempt.remote_dir,
        "flow_run_id": attempt.flow_run_id,
        "result": attempt.result and attempt.result.value,
        "exit_code": attempt.exit_code,
        "submitted_at": local_iso(attempt.submitted_at, zone),
        "started_at": local_iso(attempt.started_at, zone),
        "ended_at": local_iso(attempt.ended_at, zone),
    }


def detail_lines(detail: CaseDetail, zone: tzinfo) -> list[str]:
    """`mqi show` as text: the case, its attempts, its events."""
    case = detail.case
    lines = [
        typer.style(f"case {case.id}  {case.name}  (uid {case.uid})", bold=True),
        f"  folder:   {display_text(case.source)}",
        f"  state:    {case.state}  {case.progress}%",
    ]
    if case.failure_category:
        # A failure message may carry the tail of a log: keep its lines, indented.
        failure = f"{case.failure_category}: {case.failure_message or ''}".rstrip()
        lines.append("  failure:  " + failure.replace("\n", "\n            "))
    if case.results_path:
        lines.append(f"  results:  {display_text(case.results_path)}")
    if case.pinned_host:
        lines.append(f"  pinned:   {case.pinned_host}/{case.pinned_group or '*'}")
    created, updated = local_text(case.created_at, zone), local_text(case.updated_at, zone)
    lines.append(f"  created:  {created}   updated: {updated}")
    lines += ["", f"attempts (times in {zone})", *_attempt_lines(detail.attempts, zone)]
    lines += ["", "events", *_event_lines(detail.events, detail.attempts, zone)]
    return lines


def _first_line(text: str) -> str:
    first, _, rest = text.partition("\n")
    return f"{first} (+{len(rest.splitlines())} lines)" if rest else first


def _attempt_lines(attempts: list[Attempt], zone: tzinfo) -> list[str]:
    rows = [
        (
            str(attempt.number),
            attempt.host,
            attempt.group,
            "" if attempt.task_id is None else str(attempt.task_id),
            attempt.label,
            local_text(attempt.submitted_at, zone),
            local_text(attempt.ended_at, zone),
            str(attempt.result or "live"),
            "" if attempt.exit_code is None else str(attempt.exit_code),
        )
        for attempt in attempts
    ]
    return aligned(
        ("#", "host", "group", "task", "label", "submitted", "ended", "result", "exit"), rows
    )


def _event_lines(events: list[Event], attempts: list[Attempt], zone: tzinfo) -> list[str]:
    numbers = {attempt.id: str(attempt.number) for attempt in attempts}
    rows = [
        (
            local_text(event.at, zone),
            event.from_state or "",
            event.to_state,
            numbers.get(event.attempt_id, ""),
            event.actor,
            _first_line(event.message),
        )
        for event in events
    ]
    return aligned(("at", "from", "to", "attempt", "actor", "message"), rows)


@contextmanager
def open_ledger(*, migrate: bool = True) -> Iterator[Ledger]:
    """The ledger named by the settings, closed afterwards.

    A ledger problem (unknown case, database unreachable) ends the command with its
    message on stderr and exit code 1, without a traceback.
    """
    try:
        with Ledger.open(
            current_settings().ledger.url.get_secret_value(), migrate=migrate
        ) as ledger:
            yield ledger
    except LedgerError as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(1) from None


def _json_text(data: object) -> str:
    return json.dumps(data, indent=2, ensure_ascii=False)


def status_output(ledger: Ledger, zone: tzinfo, state: CaseState | None, as_json: bool) -> str:
    overviews = ledger.overview(state)
    if as_json:
        return _json_text(status_json(overviews, zone))
    return "\n".join(status_lines(overviews, zone, datetime.now(zone)))


def show_output(ledger: Ledger, zone: tzinfo, case: str, as_json: bool) -> str:
    detail = case_detail(ledger, case)
    return _json_text(detail_json(detail, zone)) if as_json else "\n".join(detail_lines(detail, zone))


# The parameters of these two commands are the keyword arguments of their outputs above, which
# the running main job also answers with (mqi.job_answers).
@app.command()
def status(
    state: Annotated[CaseState | None, typer.Option(help="only cases in this state")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="a JSON list instead of a table")] = False,
) -> None:
    """List the cases with their state, progress and where they run."""
    with open_ledger() as ledger:
        typer.echo(status_output(ledger, current_settings().tz, state, as_json))


@app.command()
def show(
    case: Annotated[str, typer.Argument(help="a case id, uid or folder path")],
    as_json: Annotated[bool, typer.Option("--json", help="JSON instead of tables")] = False,
) -> None:
    """One case: its details, every attempt and its full history."""
    with open_ledger() as ledger:
        typer.echo(show_output(ledger, current_settings().tz, case, as_json))


@db_app.command("upgrade")
def upgrade() -> None:
    """Bring the ledger's schema to the newest revision (also done at every start)."""
    ledger_settings = current_settings().ledger
    with open_ledger(migrate=False) as ledger:
        before = ledger.schema_revision()
        after = ledger.upgrade()
    if before == after:
        typer.echo(f"ledger {ledger_settings.display_url()}: already at revision {after}")
    else:
        typer.echo(
            f"ledger {ledger_settings.display_url()}: upgraded from {before or 'empty'} to {after}"
        )
