"""A stand-in for the MOQUI engine, used by `mqi demo` on machines without a GPU.

Run inside a case folder: `python -m mqi.demo_engine [--batches N] [--seconds-per-batch S]`.
It prints progress lines in MOQUI's form (`Generating particles for (3 of 10 batches)`),
then writes `dose.raw` and `summary.json` into `$MQI_OUTPUT_DIR` (default `./output`).
Both are computed from the case's input files, so each case gets its own result.
A case folder holding a file named `FAIL` makes it fail on purpose with exit code 3.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import struct
import sys
import time
from pathlib import Path

FAIL_MARKER = "FAIL"
FAIL_EXIT_CODE = 3
DOSE_FILE = "dose.raw"
SUMMARY_FILE = "summary.json"
DOSE_GRID = (16, 16, 16)  # float32 voxels, little-endian, x fastest


def progress_line(batch: int, batches: int) -> str:
    return f"Generating particles for ({batch} of {batches} batches)"


def describe_inputs(case: Path, output: Path) -> list[dict[str, object]]:
    """Path, size and sha256 of every input file of the case, in path order."""
    inputs = []
    for path in sorted(p for p in case.rglob("*") if p.is_file()):
        if output in path.parents:
            continue  # our own results from an earlier run are not inputs
        inputs.append(
            {
                "path": path.relative_to(case).as_posix(),
                "size": path.stat().st_size,
                "sha256": _sha256_of(path),
            }
        )
    return inputs


def _sha256_of(path: Path) -> str:
    with open(path, "rb") as handle:  # streamed: CT series can be large
        return hashlib.file_digest(handle, "sha256").hexdigest()


def dose_grid(seed: str) -> bytes:
    """A deterministic pseudo dose distribution seeded by the inputs' digest."""
    generator = random.Random(seed)
    voxels = DOSE_GRID[0] * DOSE_GRID[1] * DOSE_GRID[2]
    return struct.pack(f"<{voxels}f", *(generator.random() for _ in range(voxels)))


def run(case: Path, output: Path, batches: int, seconds_per_batch: float) -> int:
    if (case / FAIL_MARKER).exists():
        print(f"demo engine: the case contains a file named {FAIL_MARKER}; failing on purpose", file=sys.stderr)
        return FAIL_EXIT_CODE
    inputs = describe_inputs(case, output)
    for batch in range(1, batches + 1):
        time.sleep(seconds_per_batch)
        print(progress_line(batch, batches), flush=True)
    digest = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()
    dose = dose_grid(digest)
    output.mkdir(parents=True, exist_ok=True)
    (output / DOSE_FILE).write_bytes(dose)
    summary = {
        "engine": "mqi demo engine",
        "batches": batches,
        "inputs": inputs,
        "inputs_sha256": digest,
        "dose_file": DOSE_FILE,
        "dose_grid": list(DOSE_GRID),
        "dose_sha256": hashlib.sha256(dose).hexdigest(),
    }
    (output / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    print(f"Dose written to {output / DOSE_FILE}", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mqi.demo_engine", description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=10, help="number of progress steps (default 10)")
    parser.add_argument("--seconds-per-batch", type=float, default=0.5, help="pause per step (default 0.5)")
    args = parser.parse_args(argv)
    if args.batches < 1 or args.seconds_per_batch < 0:
        parser.error("--batches must be at least 1 and --seconds-per-batch at least 0")
    case = Path.cwd()
    output = Path(os.environ.get("MQI_OUTPUT_DIR", "output"))
    return run(case, output if output.is_absolute() else case / output, args.batches, args.seconds_per_batch)


if __name__ == "__main__":
    sys.exit(main())
