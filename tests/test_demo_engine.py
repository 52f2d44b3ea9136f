"""The demo engine as `mqi demo` runs it: a process inside a case folder."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from mqi.settings import MOQUI_PROGRESS_PATTERN


def run_engine(case: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mqi.demo_engine", "--seconds-per-batch", "0", *args],
        cwd=case, env=env, capture_output=True, text=True, timeout=60,
    )


def make_case(folder: Path, plan: bytes) -> Path:
    folder.mkdir()
    (folder / "plan.dcm").write_bytes(plan)
    (folder / "ct").mkdir()
    (folder / "ct" / "slice1.dcm").write_bytes(b"ct")
    return folder


def test_prints_moqui_progress_and_writes_results(tmp_path):
    case = make_case(tmp_path / "case", b"plan-a")
    result = run_engine(case, "--batches", "4")

    assert result.returncode == 0, result.stderr
    progress = [line for line in result.stdout.splitlines() if line.startswith("Generating")]
    assert progress == [f"Generating particles for ({n} of 4 batches)" for n in range(1, 5)]
    assert all(re.fullmatch(MOQUI_PROGRESS_PATTERN, line) for line in progress)
    summary = json.loads((case / "output" / "summary.json").read_text())
    assert [entry["path"] for entry in summary["inputs"]] == ["ct/slice1.dcm", "plan.dcm"]
    assert (case / "output" / "dose.raw").stat().st_size == 16**3 * 4


def test_results_differ_per_case_and_ignore_earlier_output(tmp_path):
    first = make_case(tmp_path / "a", b"plan-a")
    second = make_case(tmp_path / "b", b"plan-b")
    for case in (first, second, first):  # the first case twice: its output must not feed back
        assert run_engine(case, "--batches", "1").returncode == 0
    doses = [(case / "output" / "dose.raw").read_bytes() for case in (first, second)]
    assert doses[0] != doses[1]
    summary = json.loads((first / "output" / "summary.json").read_text())
    assert all(not entry["path"].startswith("output/") for entry in summary["inputs"])


def test_output_dir_comes_from_the_environment(tmp_path):
    case = make_case(tmp_path / "case", b"plan")
    target = tmp_path / "results"
    result = run_engine(case, "--batches", "1", env={"MQI_OUTPUT_DIR": str(target), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    assert (target / "dose.raw").exists() and not (case / "output").exists()


def test_fail_marker_fails_with_exit_code_3(tmp_path):
    case = make_case(tmp_path / "case", b"plan")
    (case / "FAIL").touch()
    result = run_engine(case)
    assert result.returncode == 3
    assert "FAIL" in result.stderr and "on purpose" in result.stderr
    assert not (case / "output").exists()


def test_rejects_nonsense_arguments(tmp_path):
    case = make_case(tmp_path / "case", b"plan")
    result = run_engine(case, "--batches", "0")
    assert result.returncode == 2 and "--batches" in result.stderr
