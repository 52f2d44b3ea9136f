"""Rows of results, the machine they were measured on, and the table printed and saved."""

from __future__ import annotations

import os
import platform
import re
import subprocess
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path


@dataclass(frozen=True)
class Row:
    """One measured figure. `met` is None for a figure that has no target of its own."""

    what: str
    figure: str
    target: str = ""
    met: bool | None = None
    peer: str = ""  # the same work done by the peer (scp), in the same run
    ratio: str = ""  # ours / peer


@dataclass
class Section:
    """The rows of one benchmark, with notes that say how they were measured and why."""

    title: str
    rows: list[Row]
    notes: list[str]


def ratio(ours: float, peer: float) -> str:
    return f"{ours / peer:.2f} x" if peer else "-"


def verdict(met: bool | None) -> str:
    return {True: "yes", False: "**NO**", None: ""}[met]


def machine() -> dict[str, str]:
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "load average at the start (1, 5, 15 min)": _load(),
        "cpu": _cpu_model(),
        "cores": str(os.cpu_count()),
        "memory": f"{_memory_gib():.1f} GiB",
        "os": platform.platform(),
        "python": platform.python_version(),
        "prefect": version("prefect"),
        "paramiko": version("paramiko"),
        "sqlalchemy": version("sqlalchemy"),
        "OpenSSH": _openssh_version(),
    }


def _load() -> str:
    # Other work on the machine inflates every figure: the load says how much there was.
    return " / ".join(f"{value:.1f}" for value in os.getloadavg())


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _memory_gib() -> float:
    match = re.search(r"MemTotal:\s+(\d+) kB", Path("/proc/meminfo").read_text())
    return int(match.group(1)) / 2**20 if match else 0.0


def _openssh_version() -> str:
    # `ssh -V` prints to stderr
    return subprocess.run(["ssh", "-V"], capture_output=True, text=True).stderr.strip()


def markdown(sections: list[Section], facts: dict[str, str], command: str) -> str:
    lines = [
        "# Benchmark results",
        "",
        f"Measured with `{command}` on {facts['date']}.",
        "",
        "| machine | |",
        "| --- | --- |",
        *(f"| {key} | {value} |" for key, value in facts.items() if key != "date"),
        f"| load average when written (1, 5, 15 min) | {_load()} |",
        "",
    ]
    for section in sections:
        lines += section_lines(section)
    return "\n".join(lines)


def section_lines(section: Section, intro: tuple[str, ...] = ()) -> list[str]:
    """One section as markdown: its title, any `intro` lines, its table and its notes."""
    lines = [f"## {section.title}", "", *intro, *([""] if intro else [])]
    lines += [*_table(section.rows), ""]
    lines += [f"- {note}" for note in section.notes]
    lines.append("")
    return lines


def _table(rows: list[Row]) -> list[str]:
    with_peer = any(row.peer for row in rows)
    header = ["what", "measured", *(["peer (scp)", "ratio"] if with_peer else []), "target", "met"]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for row in rows:
        cells = [row.what, row.figure, *([row.peer, row.ratio] if with_peer else []), row.target, verdict(row.met)]
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return lines


def plain(sections: list[Section]) -> str:
    """The tables for a terminal: aligned columns, notes left to RESULTS.md."""
    out = []
    for section in sections:
        out.append(f"\n{section.title}")
        cells = [(r.what, r.figure, f"{r.peer} {r.ratio}".strip(), r.target, verdict(r.met).strip("*"))
                 for r in section.rows]
        widths = [max(len(row[i]) for row in cells) for i in range(5)]
        for row in cells:
            out.append("  " + "  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    return "\n".join(out)
