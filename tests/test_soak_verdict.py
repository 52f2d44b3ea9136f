"""The soak benchmark's verdict and its section of RESULTS.md (benchmarks/soak.py).

The soak itself runs for hours; what decides its exit code and what it publishes is checked
here on made-up samples.
"""

from __future__ import annotations

from contextlib import nullcontext

import benchmarks.__main__ as suite
from benchmarks import soak
from benchmarks.report import Row, Section
from benchmarks.soak import Holdings, Sample, Soak


def run_of(cases: int, job_rss, server_rss=lambda done: 250.0, job_threads=lambda done: 20,
           server_fds=lambda done: 30, failed: list[str] | None = None) -> Soak:
    """A soak with one sample per finished case; each figure a function of the cases finished."""
    samples = [
        Sample("2026-01-01 00:00:00", done * 1.5, 1.0, min(cases, done + 20), done, 0,
               Holdings(1, job_rss(done), job_rss(done), job_rss(done), job_threads(done), 25),
               Holdings(2, server_rss(done), server_rss(done), server_rss(done), 12, server_fds(done)),
               Holdings())
        for done in range(cases + 1)
    ]  # fmt: skip
    return Soak(cases, samples, cases * 1.5, failed or [], [], 3)


def unmet(result: Soak) -> list[str]:
    return [row.what for row in soak.verdict_rows(result) if row.met is False]


def test_memory_that_levels_off_after_warm_up_is_flat():
    levelling = run_of(1000, job_rss=lambda done: 140 + 80 * min(done, 400) / 400)  # 140 -> 220 MB by case 400
    assert unmet(levelling) == []
    assert soak.holds(soak.verdict_rows(levelling))


def test_api_errors_are_reported_but_a_busy_server_does_not_fail_the_verdict():
    busy = run_of(1000, job_rss=lambda done: 200.0)
    busy.api_errors = ["WARNING flows.main_job: main job: Server error '503 Service Unavailable'"] * 3
    rows = soak.verdict_rows(busy)
    assert [row.figure for row in rows if "API error" in row.what] == ["3"]
    assert soak.holds(rows)


def test_memory_that_keeps_growing_in_the_second_half_fails():
    growing = run_of(1000, job_rss=lambda done: 200 + done * 0.03)  # medians: 215 MB in the middle, 228.5 at the end
    assert unmet(growing) == ["RSS of `mqi run`, middle to end"]


def test_a_thread_or_file_leak_fails_even_when_memory_is_flat():
    leaking = run_of(1000, job_rss=lambda done: 200.0, job_threads=lambda done: 20 + done // 100,
                     server_fds=lambda done: 30 + done // 50)
    assert unmet(leaking) == ["threads of `mqi run`, middle to end",
                              "open files of its Prefect server (process tree), middle to end"]
    assert not soak.holds(soak.verdict_rows(leaking))


def test_a_case_that_did_not_complete_fails():
    assert unmet(run_of(100, job_rss=lambda done: 200.0, failed=["soak-00042: failed"])) == [
        "cases completed of 100"]


def test_the_curve_has_a_row_at_the_start_and_at_every_tenth_of_the_cases():
    rows = soak.curve(run_of(200, job_rss=lambda done: 100 + done).samples, 200)[2:]
    assert [row.split("|")[1].strip() for row in rows] == [str(n) for n in range(0, 201, 20)]
    assert rows[-1].split("|")[4].strip() == "300 / 300"  # RSS / PSS of `mqi run` at the end


def test_the_suite_keeps_the_soak_section_and_the_soak_replaces_only_its_own(tmp_path):
    results = tmp_path / "RESULTS.md"
    results.write_text("# Benchmark results\n\n## Pipeline\n\n| a | b |\n")
    first = f"{soak.START_MARK}\n## Soak: 100 cases\n{soak.END_MARK}"
    soak.publish(results, first)
    assert results.read_text() == f"# Benchmark results\n\n## Pipeline\n\n| a | b |\n\n{first}\n"
    assert soak.published_block(results) == first

    second = f"{soak.START_MARK}\n## Soak: 5,000 cases\n{soak.END_MARK}"
    soak.publish(results, second)
    assert results.read_text() == f"# Benchmark results\n\n## Pipeline\n\n| a | b |\n\n{second}\n"


def test_a_run_of_the_suite_keeps_the_soak_section_it_did_not_measure(tmp_path, monkeypatch):
    results = tmp_path / "RESULTS.md"
    block = f"{soak.START_MARK}\n## Soak: 5,000 cases\n{soak.END_MARK}"
    results.write_text(f"# Benchmark results\n\n## old pipeline figures\n\n{block}\n")
    monkeypatch.setattr(suite, "BENCHMARKS", {"tiny": (lambda lab: Section("tiny", [Row("a", "1 s")], []), None)})
    monkeypatch.setattr(suite, "lab", lambda scratch: nullcontext())  # the tiny benchmark needs no servers
    monkeypatch.setattr("sys.argv", ["benchmarks", "--output", str(results)])
    suite.main()
    text = results.read_text()
    assert "## tiny" in text and "old pipeline figures" not in text
    assert text.endswith(f"\n\n{block}\n")
