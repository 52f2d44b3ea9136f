"""The main job's log file: rotation shared by processes, local times, masked secrets, private modes."""

from __future__ import annotations

import logging
import multiprocessing
import re
import stat
from pathlib import Path

import pytest

from mqi.logfile import (
    CAPTURED_LOGGERS,
    SharedRotatingFileHandler,
    SiteFormatter,
    log_file_path,
    settings_secrets,
    setup_main_job_logging,
)
from mqi.settings import Settings

SPAWN = multiprocessing.get_context("spawn")
CANARY = "canary-S3cret/pw:@x"  # characters a URL must escape
LINE_START = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+09:00 INFO    \[\d+\] ")


@pytest.fixture(autouse=True)
def restored_loggers():
    """Leave the captured loggers as they were: other tests must not write into our files."""
    loggers = [logging.getLogger(name) for name in CAPTURED_LOGGERS]
    saved = [(logger, list(logger.handlers), logger.level) for logger in loggers]
    yield
    for logger, handlers, level in saved:
        for handler in logger.handlers:
            if handler not in handlers:
                handler.close()
        logger.handlers[:] = handlers
        logger.setLevel(level)


def settings_for(tmp_path: Path, **values) -> Settings:
    return Settings(state_dir=tmp_path / "state", timezone="Asia/Seoul", **values)


def lines_of(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines()


def flush_captured() -> None:
    for name in CAPTURED_LOGGERS:
        for handler in logging.getLogger(name).handlers:
            handler.flush()


def test_lines_show_the_configured_time_zone_and_private_modes(tmp_path):
    path = setup_main_job_logging(settings_for(tmp_path))
    assert path == tmp_path / "state" / "logs" / "mqi.log"
    logging.getLogger("mqi.casework").info("case %s uploaded", "c1")
    flush_captured()
    [line] = lines_of(path)
    assert LINE_START.match(line), line
    assert line.endswith("mqi.casework: case c1 uploaded")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700


def test_setting_up_twice_writes_each_line_once(tmp_path):
    settings = settings_for(tmp_path)
    setup_main_job_logging(settings)
    path = setup_main_job_logging(settings)
    logging.getLogger("flows.process_case").warning("once")
    flush_captured()
    assert [line.rsplit(": ", 1)[1] for line in lines_of(path)] == ["once"]


def test_secrets_are_masked_in_messages_and_tracebacks(tmp_path):
    key = tmp_path / "id_ed25519"
    key.write_text("not a real key")
    settings = settings_for(
        tmp_path,
        ledger={"url": "postgresql://mqi:canary-S3cret%2Fpw%3A%40x@db.example/mqi"},
        hosts=[
            {"name": "gpu1", "transport": "ssh", "hostname": "127.0.0.1", "username": "mqi",
             "password": "canary-host-password", "key_file": key, "key_passphrase": "canary-passphrase"},
        ],
    )
    assert {CANARY, "canary-host-password", "canary-passphrase"} <= settings_secrets(settings)
    path = setup_main_job_logging(settings)
    log = logging.getLogger("mqi.transport")
    log.error("connect with %s and %s failed", "canary-host-password", "canary-passphrase")
    log.info("ledger at postgresql://mqi:canary-S3cret%2Fpw%3A%40x@db.example/mqi")
    try:
        raise RuntimeError(f"login refused for password {CANARY}")
    except RuntimeError:
        log.exception("a failure with a traceback")
    flush_captured()
    text = path.read_text()
    assert "canary" not in text
    assert text.count("***") == 4
    assert "RuntimeError: login refused for password ***" in text


def test_short_secrets_and_urls_without_passwords_mask_nothing(tmp_path):
    settings = settings_for(tmp_path, ledger={"url": "sqlite:///./mqi.db"})
    assert settings_secrets(settings) == set()


def test_rotation_keeps_the_configured_number_of_files(tmp_path):
    path = tmp_path / "mqi.log"
    handler = SharedRotatingFileHandler(path, max_bytes=2_000, backup_count=3)
    handler.setFormatter(logging.Formatter("%(message)s"))
    for number in range(200):
        handler.emit(logging.makeLogRecord({"msg": f"line {number:03d} " + "x" * 40}))
    handler.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mqi.log", "mqi.log.1", "mqi.log.2", "mqi.log.3", "mqi.log.lock"]
    assert all(p.stat().st_size <= 2_000 for p in tmp_path.glob("mqi.log*"))
    assert lines_of(path)[-1].startswith("line 199 ")
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in tmp_path.iterdir())
    kept = [line for name in ("mqi.log.3", "mqi.log.2", "mqi.log.1", "mqi.log") for line in lines_of(tmp_path / name)]
    assert kept == [f"line {n:03d} " + "x" * 40 for n in range(200 - len(kept), 200)], "lines lost or reordered"


def _write_lines(path: str, writer: int, count: int) -> None:
    handler = SharedRotatingFileHandler(Path(path), max_bytes=4_000, backup_count=1_000)
    handler.setFormatter(logging.Formatter("%(message)s"))
    for number in range(count):
        handler.emit(logging.makeLogRecord({"msg": f"writer {writer} line {number:04d} " + "y" * 30}))
    handler.close()


def test_processes_share_one_rotating_file_without_losing_lines(tmp_path):
    path, writers, count = tmp_path / "mqi.log", 3, 400
    processes = [SPAWN.Process(target=_write_lines, args=(str(path), w, count)) for w in range(writers)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(60)
    assert [p.exitcode for p in processes] == [0] * writers
    files = [p for p in tmp_path.glob("mqi.log*") if not p.name.endswith(".lock")]
    assert len(files) > 5, "the test did not rotate"
    assert all(p.stat().st_size <= 4_000 for p in files), "a file grew past the limit: rotations raced"
    lines = [line for p in files for line in lines_of(p)]
    expected = {f"writer {w} line {n:04d} " + "y" * 30 for w in range(writers) for n in range(count)}
    assert len(lines) == len(expected) and set(lines) == expected


def test_a_real_flow_run_logs_into_the_file(tmp_path, prefect_server):
    from prefect import flow, get_run_logger

    path = setup_main_job_logging(settings_for(tmp_path))

    @flow(name="log-file-check", flow_run_name="log-file-run")
    def say_hello() -> None:
        get_run_logger().info("hello from the flow run")

    say_hello()
    flush_captured()
    [line] = [line for line in lines_of(path) if "hello from the flow run" in line]
    assert LINE_START.match(line)
    assert "prefect.flow_runs [flow run 'log-file-run']: hello from the flow run" in line
    assert log_file_path(settings_for(tmp_path)) == path


def test_formatter_alone_masks_and_shows_zone():
    from zoneinfo import ZoneInfo

    formatter = SiteFormatter(ZoneInfo("UTC"), {"hunter22"})
    record = logging.makeLogRecord({"msg": "pw hunter22", "created": 0.0, "name": "mqi", "levelname": "INFO"})
    record.mqi_run_label = ""
    assert formatter.format(record).startswith("1970-01-01T00:00:00.000+00:00 INFO")
    assert formatter.format(record).endswith("mqi: pw ***")
