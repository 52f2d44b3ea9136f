"""The main job's log file: `state_dir/logs/mqi.log`, rotated, secrets masked, local times.

What goes in: the project's loggers (`mqi`, `flows`, `tasks`, `blocks`) and Prefect's flow
and task run loggers. Lines read

    2026-03-02T18:04:05.123+09:00 INFO    [4711] prefect.flow_runs [flow run 'brave-fox']: ...

with times in the configured time zone (offset shown). The file rotates at 10 MB and keeps
10 old files (`mqi.log.1` ... `mqi.log.10`), created with mode 0600 in a 0700 folder.

Several processes may write the file at once (the main job, flow runs Prefect starts in
subprocesses, commands): each write and each rotation happens under an exclusive lock on
`mqi.log.lock`, and a process whose file was rotated away by another reopens the new one.
Values of the secret settings (passwords, key passphrases, the ledger URL's password) are
masked wherever they appear in a line, tracebacks included.
"""

from __future__ import annotations

import fcntl
import logging
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import datetime, tzinfo
from logging.handlers import RotatingFileHandler
from pathlib import Path
from urllib.parse import quote

from pydantic import BaseModel, SecretStr
from sqlalchemy import make_url
from sqlalchemy.exc import ArgumentError

from mqi.settings import Settings

LOG_FOLDER = "logs"
LOG_FILE_NAME = "mqi.log"
MAX_BYTES = 10 * 1024 * 1024
BACKUP_COUNT = 10
FILE_MODE = 0o600
FOLDER_MODE = 0o700
CAPTURED_LOGGERS = ("mqi", "flows", "tasks", "blocks", "prefect.flow_runs", "prefect.task_runs")
LINE_FORMAT = "%(asctime)s %(levelname)-7s [%(process)d] %(name)s%(mqi_run_label)s: %(message)s"
MASK = "***"
# Shorter secrets are not masked: masking every "ab" in the log would ruin it and tell the secret.
MIN_MASKED_LENGTH = 4


def log_file_path(settings: Settings) -> Path:
    return settings.state_dir / LOG_FOLDER / LOG_FILE_NAME


def setup_main_job_logging(settings: Settings) -> Path:
    """Send the captured loggers to the log file; returns its path. Calling it again replaces the handler.

    Imports Prefect's logging setup and runs it first, because its first run replaces the
    handlers of the Prefect loggers: so set up Prefect's environment before calling this.
    """
    from prefect.logging.configuration import ensure_logging_setup

    ensure_logging_setup()
    path = log_file_path(settings)
    path.parent.mkdir(mode=FOLDER_MODE, parents=True, exist_ok=True)
    handler = SharedRotatingFileHandler(path)
    handler.setFormatter(SiteFormatter(settings.tz, settings_secrets(settings)))
    handler.addFilter(label_runs)
    for name in CAPTURED_LOGGERS:
        logger = logging.getLogger(name)
        for old in [h for h in logger.handlers if isinstance(h, SharedRotatingFileHandler)]:
            logger.removeHandler(old)
            old.close()
        logger.addHandler(handler)
        if logger.level == logging.NOTSET and not name.startswith("prefect."):
            logger.setLevel(logging.INFO)  # else the root's WARNING would hide our INFO lines
    return path


class SharedRotatingFileHandler(RotatingFileHandler):
    """A RotatingFileHandler that several processes can share (see the module's docstring)."""

    def __init__(self, path: Path, max_bytes: int = MAX_BYTES, backup_count: int = BACKUP_COUNT):
        super().__init__(path, maxBytes=max_bytes, backupCount=backup_count, encoding="utf-8", delay=True)
        self._lock_descriptor = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT, FILE_MODE)

    def _open(self):
        return open(self.baseFilename, self.mode, encoding=self.encoding, opener=_private_file)

    def emit(self, record: logging.LogRecord) -> None:
        with self._across_processes():
            self._reopen_if_rotated_elsewhere()
            super().emit(record)  # rotates first if this line would overfill the file

    def close(self) -> None:
        with self.lock:
            super().close()
            if self._lock_descriptor >= 0:
                os.close(self._lock_descriptor)
                self._lock_descriptor = -1

    @contextmanager
    def _across_processes(self) -> Iterator[None]:
        fcntl.flock(self._lock_descriptor, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self._lock_descriptor, fcntl.LOCK_UN)

    def _reopen_if_rotated_elsewhere(self) -> None:
        if self.stream is None:
            return
        try:
            on_disk = os.stat(self.baseFilename)
        except FileNotFoundError:
            on_disk = None
        ours = os.fstat(self.stream.fileno())
        if on_disk is None or (on_disk.st_dev, on_disk.st_ino) != (ours.st_dev, ours.st_ino):
            self.stream.close()
            self.stream = None  # the next write opens the current file


def _private_file(path: str, flags: int) -> int:
    return os.open(path, flags, FILE_MODE)


def label_runs(record: logging.LogRecord) -> bool:
    """Name the Prefect flow or task run a line comes from (a handler filter; keeps every record)."""
    task_run, flow_run = getattr(record, "task_run_name", None), getattr(record, "flow_run_name", None)
    if task_run:
        record.mqi_run_label = f" [task run {task_run!r}]"
    elif flow_run:
        record.mqi_run_label = f" [flow run {flow_run!r}]"
    else:
        record.mqi_run_label = ""
    return True


class SiteFormatter(logging.Formatter):
    """Lines with ISO times in `zone` (offset shown) and the given secrets masked."""

    def __init__(self, zone: tzinfo, secrets: Iterable[str] = ()):
        super().__init__(LINE_FORMAT)
        self.zone = zone
        self._secrets = sorted(set(secrets), key=len, reverse=True)  # longest first: no partial leftovers

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return datetime.fromtimestamp(record.created, self.zone).isoformat(timespec="milliseconds")

    def format(self, record: logging.LogRecord) -> str:
        return self.mask(super().format(record))

    def mask(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, MASK)
        return text


def settings_secrets(settings: Settings) -> set[str]:
    """The values of every secret setting, as written plain and as written inside a URL.

    A secret that is a database URL (the ledger's) counts for its password only.
    """
    found = set()
    for secret in _secret_fields(settings):
        value = secret.get_secret_value()
        try:
            found.add(make_url(value).password or "")
        except ArgumentError:
            found.add(value)
    found |= {quote(value, safe="") for value in found}
    return {value for value in found if len(value) >= MIN_MASKED_LENGTH}


def _secret_fields(value: object) -> Iterator[SecretStr]:
    if isinstance(value, SecretStr):
        yield value
    elif isinstance(value, BaseModel):
        for name in type(value).model_fields:
            yield from _secret_fields(getattr(value, name))
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _secret_fields(item)
