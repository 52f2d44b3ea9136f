"""Times are stored in UTC and shown in the configured time zone."""

from __future__ import annotations

from datetime import datetime, timezone, tzinfo


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


def local_iso(moment: datetime | None, zone: tzinfo) -> str | None:
    return None if moment is None else moment.astimezone(zone).isoformat()


def local_text(moment: datetime | None, zone: tzinfo, format: str = "%Y-%m-%d %H:%M:%S") -> str:
    return "" if moment is None else moment.astimezone(zone).strftime(format)
