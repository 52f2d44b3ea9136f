"""`mqi hosts`: each configured host, whether it answers, its queue groups and its GPUs.

The data comes from `mqi.host_report` (plain functions, tested on their own); this module
only lays it out. The exit code is 1 when a host did not answer, so a monitoring script can
tell without parsing.
"""

from __future__ import annotations

import json
import threading
from datetime import tzinfo
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from mqi.cli.command_line import app, current_settings
from mqi.host_report import (
    DEFAULT_TIMEOUT,
    HostReport,
    foreign_text,
    gpu_text,
    health_text,
    host_reports,
    report_json,
    status_text,
)
from mqi.site import Site


@app.command("hosts")
def hosts(
    as_json: Annotated[bool, typer.Option("--json", help="a JSON list instead of tables")] = False,
    timeout: Annotated[
        float, typer.Option(min=0.1, help="seconds to wait for each host (they are asked at once)")
    ] = DEFAULT_TIMEOUT,
) -> None:
    """Show each host: reachable or not (and why), pueue, groups with their tasks, GPUs."""
    settings = current_settings()
    site = Site(settings)
    try:
        reports = host_reports(site, timeout)
    finally:
        _close_without_waiting(site)
    if as_json:
        typer.echo(json.dumps([report_json(r, settings.tz) for r in reports], indent=2))
    else:
        console = Console()
        for table in (
            hosts_table(reports, settings.tz),
            groups_table(reports),
            gpus_table(reports),
        ):
            console.print(table)
    if not all(report.reachable for report in reports):
        raise typer.Exit(1)


def _close_without_waiting(site: Site, seconds: float = 1.0) -> None:
    # A transport still connecting to a dead host holds close() until it gives up; the
    # process exit closes that socket anyway.
    closer = threading.Thread(target=site.close, name="mqi-hosts-close", daemon=True)
    closer.start()
    closer.join(seconds)


def hosts_table(reports: list[HostReport], zone: tzinfo) -> Table:
    table = Table(title="hosts", title_justify="left")
    for column in ("host", "address", "status", "queue", "placement"):
        table.add_column(column)
    for report in reports:
        status = status_text(report)
        table.add_row(
            report.name,
            report.address,
            status if report.reachable else f"[red]{_escaped(status)}[/red]",
            _escaped(report.queue_problem or report.queue or ""),
            health_text(report.health, zone),
        )
    return table


def groups_table(reports: list[HostReport]) -> Table:
    table = Table(title="groups", title_justify="left")
    causes = any(group.pause_cause for report in reports for group in report.groups)
    columns = ("host", "group", "devices", "slots", "on host", "running", "queued") + (("why paused",) if causes else ())
    for column in columns:
        table.add_column(
            column, justify="right" if column in ("slots", "running", "queued") else "left"
        )
    for report in reports:
        for group in report.groups:
            on_host = group.on_host or "?"
            cause = (_escaped(group.pause_cause or ""),) if causes else ()
            table.add_row(
                report.name,
                group.name,
                group.devices or "all",
                str(group.slots),
                on_host if on_host == "ok" else f"[yellow]{on_host}[/yellow]",
                str(group.running),
                str(group.queued),
                *cause,
            )
    return table


def gpus_table(reports: list[HostReport]) -> Table:
    table = Table(title="GPUs", title_justify="left")
    for column in ("host", "gpu", "name", "use, memory", "foreign processes"):
        table.add_column(column)
    for report in reports:
        if report.gpu_problem:
            table.add_row(
                report.name, "", f"[yellow]{_escaped(report.gpu_problem)}[/yellow]", "", ""
            )
        for line in report.gpus:
            foreign = foreign_text(line)
            table.add_row(
                report.name,
                str(line.gpu.index),
                _escaped(line.gpu.name),
                gpu_text(line.gpu),
                f"[yellow]{_escaped(foreign)}[/yellow]" if foreign else "",
            )
    return table


def _escaped(text: str) -> str:
    # Messages and process names come from hosts: '[' must not be read as rich markup.
    return escape(text)
