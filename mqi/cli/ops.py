"""Commands for the people who run a site: `mqi db backup`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mqi.backup import backup_ledger
from mqi.cli.command_line import current_settings, db_app


@db_app.command("backup")
def backup(
    path: Annotated[Path, typer.Argument(help="the backup file to write (SQLite copy or pg_dump archive)")],
    force: Annotated[bool, typer.Option("--force", help="replace PATH if it exists")] = False,
) -> None:
    """Copy the live ledger to PATH (mode 0600) and check the copy; mqi run may keep running."""
    ledger = current_settings().ledger
    report = backup_ledger(ledger.url.get_secret_value(), path, force=force)
    typer.echo(
        f"ledger {ledger.display_url()} backed up to {report.path}: schema revision "
        f"{report.revision}, cases: {report.cases}, {report.size_bytes:,} bytes"
    )
