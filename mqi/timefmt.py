"""Times are stored in UTC and shown in the configured time zone."""

from __future__ import annotations

from datetime import datetime, timezone, tzinfo


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


def show_time(moment: datetime | None, tz: tzinfo) -> str:
    if moment is None:
        return "-"
    return moment.astimezone(tz).strftime("%Y-%m-%d %H:%M:%S %z")
