"""Commands that run cases: submit, cancel, retry, reconcile, run (the main job), demo.

Prefect reads its settings when it is first imported, so each command sets up the Prefect
environment from our settings first and imports the flows after that.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Annotated

import typer

from mqi.cli.command_line import UserError, app, config_file, current_settings, current_settings_inputs
from mqi.errors import MqiError
from mqi.instance_lock import hold_run_locks
from mqi.logfile import setup_main_job_logging
from mqi.prefect_server import apply_prefect_env, configure_prefect_env, use_prefect
from mqi.settings import Settings



def prepare_prefect(settings: Settings) -> None:
    """Point Prefect at the configured server, the running embedded one, or an ephemeral one."""
    apply_prefect_env(configure_prefect_env(settings))
    export_config_path()


def export_config_path() -> None:
    """Flow runs in other processes (served runs, workers) read the same settings file."""
    path = config_file() or (Path(os.environ["MQI_CONFIG"]) if os.environ.get("MQI_CONFIG") else None)
    if path is not None:
        os.environ["MQI_CONFIG"] = str(path.resolve())


def start_site(settings: Settings):
    """Prefect pointed at its server, hosts from saved blocks resolved, GPU limits repaired."""
    prepare_prefect(settings)
    from blocks import resolve_host_blocks
    from mqi.runtime import use_settings
    import tasks.publish  # noqa: F401 (its site hook shows cases and slots in Prefect, limits repaired)

    return use_settings(resolve_host_blocks(settings))


@app.command()
def submit(
    path: Annotated[Path, typer.Argument(help="the case folder")],
    host: Annotated[str | None, typer.Option(help="run on this host")] = None,
    group: Annotated[str | None, typer.Option(help="run in this GPU group")] = None,
) -> None:
    """Process one case now, in this process; exit 0 when completed, 1 when not (also when a
    host needs an operator: its key changed, our credentials refused; the case stays as it was)."""
    if not path.is_dir():
        raise UserError(f"{path} is not a folder")
    settings = current_settings()
    if host:
        settings.host(host)
    site = start_site(settings)
    site.waits_for_operator = False  # the user is here: tell them now, do not wait for the fix
    from flows.process_case import process_case

    state = process_case(case=_flow_parameter(site, path.resolve()), host=host, group=group)
    from mqi.ledger.store import display_text

    typer.echo(f"case {display_text(path.name)}: {state}")
    raise typer.Exit(0 if state == "completed" else 1)


def _flow_parameter(site, folder: Path) -> str:
    """The folder for the flow; flow parameters travel as JSON, so a name that is not UTF-8
    is registered here and the case passed by its id."""
    try:
        os.fsencode(folder).decode("utf-8")
        return str(folder)
    except UnicodeDecodeError:
        case, _ = site.ledger.register_case(folder, actor="cli")
        return str(case.id)


@app.command()
def cancel(case: Annotated[str, typer.Argument(help="id, uid or folder")]) -> None:
    """Kill the case's remote task (confirmed) and mark it cancelled."""
    site = start_site(current_settings())
    from mqi import casework

    record = site.ledger.find_case(case)
    if not casework.cancel(site, record, "cli", "cancelled from the command line"):  # a finished case: an error
        raise UserError(f"case {record.name}: cancel recorded, but the kill of its task could not be confirmed "
                        "yet; its run (or reconcile) tries again until it is")
    typer.echo(f"case {record.name}: cancelled")


@app.command()
def retry(
    case: Annotated[str, typer.Argument(help="id, uid or folder")],
    now: Annotated[bool, typer.Option("--now", help="process it in this process at once")] = False,
) -> None:
    """Queue a finished case again as a new attempt; earlier attempts stay as they were."""
    site = start_site(current_settings())
    from mqi.ledger.states import FINISHED_STATES, CaseState

    record = site.ledger.find_case(case)
    if site.ledger.transition(record.id, CaseState.PENDING, actor="cli", message="retry requested",
                              only_from=FINISHED_STATES) is None:
        state = site.ledger.get_case(record.id).state
        raise UserError(f"case {record.name} is {state.value}: only a finished case can be retried")
    typer.echo(f"case {record.name}: pending again (attempt {len(site.ledger.attempts(record.id)) + 1} next)")
    if now:
        from flows.process_case import process_case

        site.waits_for_operator = False

        state = process_case(case=str(record.id))
        typer.echo(f"case {record.name}: {state}")
        raise typer.Exit(0 if state == "completed" else 1)


@app.command("reconcile")
def reconcile_command() -> None:
    """Resume orphaned cases, retry unconfirmed kills, adopt lost task ids, report slots."""
    start_site(current_settings())
    from flows.reconcile import reconcile

    for note in reconcile():
        typer.echo(note)


@app.command()
def run() -> None:
    """The main job: scan the inbox, reconcile, and process cases until stopped (Ctrl-C)."""
    settings = current_settings()
    export_config_path()
    # systemd's stop, the same as Ctrl-C from the start: one during the server's start stops it too.
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    try:
        # The lock first: a second `mqi run` is told who holds the inbox, not a port clash.
        with hold_run_locks(settings), use_prefect(settings, embedded_server=True, notify=typer.echo) as api_url:
            log_file = setup_main_job_logging(settings)  # after use_prefect: Prefect's env is set
            typer.echo(f"Prefect UI: {api_url.removesuffix('/api')}  (API {api_url})")
            typer.echo(f"log file: {log_file}")
            serve_until_stopped(settings)
    except KeyboardInterrupt:
        typer.echo("mqi run: stopped")


def serve_until_stopped(settings: Settings) -> None:
    """Scan, process cases and serve the UI's runs in this process until Ctrl-C or SIGTERM."""
    site = start_site(settings)
    from flows.main_job import MainJob

    MainJob(site, current_settings_inputs()).run()


def _stop_on_sigterm(signum, frame) -> None:
    raise KeyboardInterrupt


@app.command()
def demo(
    folder: Annotated[Path, typer.Option(help="where the demo keeps its cases and results")] = Path("mqi-demo"),
    cases: Annotated[int, typer.Option(min=1, max=20, help="how many sample cases")] = 3,
) -> None:
    """Run sample cases through the whole pipeline here, with a small engine stand-in."""
    from mqi.demo import run_demo

    try:
        run_demo(folder.resolve(), cases)
    except MqiError as exc:
        raise UserError(str(exc)) from None
