"""Tables of the case ledger. Only the ledger store uses these rows; callers get dataclasses.

Columns that hold times use UTCDateTime, and the case folder uses FolderPath, so that both
SQLite and PostgreSQL give back exactly what was stored.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    false,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

# Stable constraint names, so that later migrations can refer to them on every database.
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def as_utc(moment: datetime) -> datetime:
    """The same instant in UTC; a naive datetime is refused, its zone would be a guess."""
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError(f"naive datetime {moment.isoformat()} given; the ledger needs aware times")
    return moment.astimezone(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC datetime on every database.

    SQLite has no time zones: it stores naive UTC and we attach UTC when reading.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        value = as_utc(value)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


_SURROGATE = re.compile("[\udc80-\udcff]")
_ESCAPE = re.compile(r"\\(\\|x[0-9a-f]{2})")


class FolderPath(TypeDecorator[str]):
    """A file-system path as text, including bytes that are not valid UTF-8.

    os.fsdecode turns such bytes into lone surrogates, which no database driver accepts.
    They are stored as `\\xNN` and a literal backslash as `\\\\`, which is reversible and
    keeps ordinary paths unchanged, so equality lookups on the stored text stay exact.
    """

    impl = Text
    cache_ok = True

    def process_bind_param(self, value: str | None, dialect: Dialect) -> str | None:
        if value is None:
            return None
        value = value.replace("\\", "\\\\")
        return _SURROGATE.sub(lambda m: f"\\x{ord(m.group()) - 0xDC00:02x}", value)

    def process_result_value(self, value: str | None, dialect: Dialect) -> str | None:
        if value is None:
            return None
        return _ESCAPE.sub(_unescape_one, value)


def _unescape_one(match: re.Match[str]) -> str:
    token = match.group(1)
    return "\\" if token == "\\" else chr(0xDC00 + int(token[1:], 16))


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {datetime: UTCDateTime()}


class CaseRow(Base):
    __tablename__ = "cases"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    uid: Mapped[str] = mapped_column(String(16), unique=True)
    source: Mapped[str] = mapped_column(FolderPath(), unique=True)
    name: Mapped[str] = mapped_column(Text)
    state: Mapped[str] = mapped_column(String(16), index=True)
    progress: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]
    failure_category: Mapped[str | None] = mapped_column(String(16))
    failure_message: Mapped[str | None] = mapped_column(Text)
    results_path: Mapped[str | None] = mapped_column(FolderPath())
    pinned_host: Mapped[str | None] = mapped_column(String(255))
    pinned_group: Mapped[str | None] = mapped_column(String(255))
    # Set by a cancel before anything is killed: every later step of a run refuses to go on.
    cancel_requested_at: Mapped[datetime | None]


class AttemptRow(Base):
    __tablename__ = "attempts"
    __table_args__ = (UniqueConstraint("case_id", "number"),
                      Index("ix_attempts_holds_slot_host_pueue_group", "holds_slot", "host", "pueue_group"))

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    case_id: Mapped[int] = mapped_column(ForeignKey("cases.id"))
    number: Mapped[int] = mapped_column(Integer)
    host: Mapped[str] = mapped_column(String(255))
    pueue_group: Mapped[str] = mapped_column(String(255))
    pueue_task_id: Mapped[int | None] = mapped_column(Integer)
    pueue_label: Mapped[str] = mapped_column(String(255))
    remote_dir: Mapped[str] = mapped_column(Text)
    flow_run_id: Mapped[str | None] = mapped_column(String(64))
    submitted_at: Mapped[datetime]
    started_at: Mapped[datetime | None]
    ended_at: Mapped[datetime | None]
    exit_code: Mapped[int | None] = mapped_column(Integer)
    result: Mapped[str | None] = mapped_column(String(16))  # None while the attempt is live
    # One slot of its GPU group, from admission until the task is finished or killed.
    holds_slot: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())


class EventRow(Base):
    __tablename__ = "case_events"
    __table_args__ = (Index("ix_case_events_case_id_id", "case_id", "id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    case_id: Mapped[int] = mapped_column(ForeignKey("cases.id"))
    at: Mapped[datetime]
    from_state: Mapped[str | None] = mapped_column(String(16))  # None when the case was registered
    to_state: Mapped[str] = mapped_column(String(16))
    attempt_id: Mapped[int | None] = mapped_column(ForeignKey("attempts.id"))
    actor: Mapped[str] = mapped_column(String(255))
    message: Mapped[str] = mapped_column(Text, default="")


class GpuGroupRow(Base):
    __tablename__ = "gpu_groups"
    __table_args__ = (UniqueConstraint("host", "pueue_group"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    host: Mapped[str] = mapped_column(String(255))
    pueue_group: Mapped[str] = mapped_column(String(255))
    slots: Mapped[int] = mapped_column(Integer)
    devices: Mapped[list[str]] = mapped_column(JSON)
    active: Mapped[bool] = mapped_column(Boolean, default=True)  # False: removed from config
    updated_at: Mapped[datetime]
