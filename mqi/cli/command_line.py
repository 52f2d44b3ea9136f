"""The `mqi` command: the typer app, the global --config option and user-error handling.

Command modules register themselves on `app` (or `db_app`); `mqi.cli` imports them all.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from typer.core import TyperGroup

from mqi.errors import ConfigError, MqiError
from mqi.settings import Settings, load_settings
from mqi.settings_inputs import SettingsInputs


class UserError(MqiError):
    """A mistake or condition the user can act on: one message, no traceback."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


class _UserErrorGroup(TyperGroup):
    """Shows our errors as one line on stderr with their exit code (2: bad settings)."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except MqiError as exc:
            code = getattr(exc, "exit_code", 2 if isinstance(exc, ConfigError) else 1)
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(code) from None


app = typer.Typer(
    cls=_UserErrorGroup,
    help="MQI Communicator: QA cases from the inbox to MOQUI results on GPU servers.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
db_app = typer.Typer(help="The case ledger database.", no_args_is_help=True)
config_app = typer.Typer(help="The settings.", no_args_is_help=True)
app.add_typer(db_app, name="db")
app.add_typer(config_app, name="config")

_config_file: Path | None = None
_settings: Settings | None = None
_settings_inputs: SettingsInputs | None = None


@app.callback()
def _global_options(
    config: Annotated[
        Path | None,
        typer.Option("--config", "-c", help="settings file (default: $MQI_CONFIG or ./mqi.yaml)"),
    ] = None,
) -> None:
    global _config_file, _settings
    _config_file, _settings = config, None


def config_file() -> Path | None:
    """The --config value given on the command line, if any."""
    return _config_file


def current_settings() -> Settings:
    """The settings for this invocation, read once (raises ConfigError)."""
    global _settings, _settings_inputs
    if _settings is None:
        # Taken before reading: if the file is edited in between, no process has these inputs.
        _settings_inputs = SettingsInputs.of_this_process(_config_file)
        _settings = load_settings(_config_file)
    return _settings


def current_settings_inputs() -> SettingsInputs:
    """What `current_settings()` were read from (the main job answers askers with the same)."""
    current_settings()
    assert _settings_inputs is not None
    return _settings_inputs
