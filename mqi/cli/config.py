"""`mqi config check`: show the effective settings or name every problem."""

from __future__ import annotations

import yaml
import typer

from mqi.cli.command_line import config_app, config_file
from mqi.errors import ConfigError
from mqi.settings import load_settings
from mqi.settings_inputs import config_path


@config_app.command("check")
def check() -> None:
    """Print the effective settings (secrets masked), or every problem found (exit 2)."""
    path, _ = config_path(config_file())
    try:
        settings = load_settings(config_file())
    except ConfigError as exc:
        typer.echo(f"{exc.source or path}: {len(exc.problems)} problem(s):", err=True)
        for problem in exc.problems:
            typer.echo(f"  - {problem}", err=True)
        raise typer.Exit(2) from None
    source = str(path) if path.exists() else "embedded defaults (no config file)"
    typer.echo(f"# effective settings from {source}")
    typer.echo(yaml.safe_dump(settings.masked(), sort_keys=False, allow_unicode=True), nl=False)
