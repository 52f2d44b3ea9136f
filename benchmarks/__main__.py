"""Run the benchmark suite, print the tables and write them to benchmarks/RESULTS.md.

    .venv/bin/python -m benchmarks [--only transfer,polling,ledger,pipeline] [--quick]
        [--scratch DIR] [--output FILE]
    .venv/bin/python -m benchmarks soak [--cases 5000] [--quick] ...

--quick runs every benchmark on smaller numbers (a check that the suite works, not figures
to compare with the targets); --only runs some of them. The soak (benchmarks/soak.py, hours
long) runs on its own and writes its own section of RESULTS.md, which the suite keeps.
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from benchmarks import ledger, pipeline, polling, soak, transfer
from benchmarks.harness import Lab, lab
from benchmarks.report import Section, machine, markdown, plain

RESULTS = Path(__file__).with_name("RESULTS.md")

# name: (full run, quick run), each given the lab (sshd and pueue stand-in) to run against
BENCHMARKS: dict[str, tuple[Callable[[Lab], Section], Callable[[Lab], Section]]] = {
    "transfer": (transfer.run, lambda servers: transfer.run(servers, repeat=1, big_mb=20, small_count=200)),
    "polling": (polling.run, lambda servers: polling.run(servers, counts=(1, 10), tasks=50, polls=5)),
    "ledger": (lambda servers: ledger.run(servers.root / "ledger"),
               lambda servers: ledger.run(servers.root / "ledger", count=1000)),
    "pipeline": (pipeline.run, lambda servers: pipeline.run(servers, overhead_cases=3, gap_cases=4, gap_seconds=2,
                                                             burst_cases=50, burst_observe=15)),
}


def run_one(name: str, quick: bool, scratch: Path | None) -> Section:
    """One benchmark in a lab of its own; a failure becomes a section that says so."""
    started = time.monotonic()
    print(f"running {name} ...", file=sys.stderr, flush=True)
    try:
        with lab(scratch) as servers:
            section = BENCHMARKS[name][quick](servers)
    except Exception as error:  # the other benchmarks still run and are reported
        traceback.print_exc()
        section = Section(f"{name}: FAILED", [], [f"{type(error).__name__}: {error}"])
    print(f"  {name} took {time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)
    return section


def main() -> None:
    if sys.argv[1:2] == ["soak"]:
        sys.exit(soak.main(sys.argv[2:]))
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0],
                                     epilog="The soak runs on its own: python -m benchmarks soak --help")
    parser.add_argument("--only", default=",".join(BENCHMARKS), help="comma-separated: " + ", ".join(BENCHMARKS))
    parser.add_argument("--quick", action="store_true", help="smaller numbers: checks the suite, not the targets")
    parser.add_argument("--scratch", type=Path, default=None, help="where temporary servers and data go")
    parser.add_argument("--output", type=Path, default=None, help=f"default {RESULTS} (not written with --quick)")
    args = parser.parse_args()
    chosen = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = sorted(set(chosen) - set(BENCHMARKS))
    if "soak" in unknown:
        parser.error("the soak runs on its own, for hours: python -m benchmarks soak [--quick]")
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")

    facts = machine()
    output = args.output or (None if args.quick else RESULTS)
    command = "python -m benchmarks" + ("" if chosen == list(BENCHMARKS) else f" --only {','.join(chosen)}")
    kept_soak = soak.published_block(output) if output is not None else ""  # measured on its own
    kept_soak = f"\n{kept_soak}\n" if kept_soak else ""
    sections = []
    for name in chosen:
        sections.append(run_one(name, args.quick, args.scratch))
        if output is not None:  # after each benchmark: a later failure keeps what was measured
            output.write_text(markdown(sections, facts, command) + kept_soak)
    print(plain(sections))
    if output is not None:
        print(f"\nwritten to {output}")


if __name__ == "__main__":
    main()
