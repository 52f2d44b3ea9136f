"""`mqi demo`: sample cases through the whole pipeline on this machine, no setup needed.

It uses the local transport and local queue, two GPU groups of one slot each, and the
engine stand-in `mqi.demo_engine`; one case fails on purpose to show a failure's record.
"""

from __future__ import annotations

import shlex
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import typer
import yaml
from rich.console import Console

from mqi.settings import Settings
from mqi.timefmt import utc_now

SAMPLE_FILES = {
    "RTPLAN.dcm": b"DICM demo RT plan\n",
    "logs/beam_1.log": b"spot,energy,mu\n1,150.0,0.5\n2,151.2,0.4\n",
    "logs/beam_2.log": b"spot,energy,mu\n1,120.3,0.7\n",
}


def demo_settings(folder: Path) -> Settings:
    engine = f"{shlex.quote(sys.executable)} -m mqi.demo_engine --batches 5 --seconds-per-batch 0.2"
    return Settings(
        state_dir=folder / ".mqi",
        inbox={"path": folder / "inbox", "quiet_seconds": 0},
        results_dir=folder / "results",
        ledger={"url": f"sqlite:///{folder / 'mqi.db'}"},
        case={"command": engine, "poll_seconds": 0.5},
        hosts=[{
            "name": "local", "transport": "local", "queue": "local", "workdir": str(folder / "work"),
            "groups": [{"name": "gpu0", "slots": 1, "devices": "0"}, {"name": "gpu1", "slots": 1, "devices": "1"}],
        }],
    )


def make_sample_cases(inbox: Path, count: int) -> list[Path]:
    folders = []
    for number in range(1, count + 1):
        folder = inbox / f"demo-case-{number:02d}"
        for name, content in SAMPLE_FILES.items():
            path = folder / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content + f"case {number}\n".encode())
        if number == count and count > 1:
            (folder / "FAIL").write_text("the demo engine fails this case on purpose\n")
        folders.append(folder)
    return folders


def run_demo(folder: Path, count: int) -> None:
    from mqi.cli.orchestrate import start_site

    console = Console()
    settings = demo_settings(folder)
    site = start_site(settings)
    from flows.process_case import process_case
    from mqi.casework import total_slots

    folders = make_sample_cases(settings.inbox.path, count)
    cases = [site.ledger.register_case(f, actor="demo")[0] for f in folders]
    console.print(f"[bold]{len(cases)} sample cases[/] in {settings.inbox.path}; running them on 2 GPU groups ...")
    with ThreadPoolExecutor(max_workers=total_slots(site)) as pool:
        states = list(pool.map(lambda case: process_case(case=str(case.id)), cases))
    from mqi.cli.cases import status_lines

    typer.echo("\n".join(status_lines(site.ledger.overview(), settings.tz, utc_now())))  # strips colour off a tty
    config = folder / "mqi.yaml"
    config.write_text(yaml.safe_dump(settings.masked() | {"ledger": {"url": settings.ledger.url.get_secret_value()}}))
    console.print(f"results in {settings.results_dir}")
    console.print(f"look closer: mqi --config {config} show {cases[-1].id}")
    if states.count("completed") != len(cases) - (1 if count > 1 else 0):
        sys.exit(1)
