"""Which hosts answer, shared by every process of the site through one small file per host.

A host that cannot be reached (connection refused, no route, credentials or host key refused)
is marked down in `state_dir/hosts/<host>.json` with the reason, so that `mqi hosts` shows it
and placement skips it while the other hosts carry on. A host marked down is not given up:
once its back-off interval has passed, `reachable_hosts` offers it again for one try, and
the outcome of that try is recorded like any other. The interval doubles with each failure
(a flapping host is not hammered) up to a ceiling; a failure a retry cannot fix (refused
credentials or host key: the host *needs an operator*) waits the ceiling at once, since it
needs a person first.

A record is *news* when the host comes back, goes away, or its problem changes kind (a
network fault, or one that needs an operator): the site announces news once (an event),
however many callers record the same failure.

Several processes record at once: a record is read, changed and written atomically under an
exclusive `flock` on `<host>.lock`; readers need no lock. All times are aware UTC.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import re
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timedelta
from pathlib import Path

from mqi.queue.local import write_json_atomic
from mqi.settings import NAME_PATTERN
from mqi.timefmt import utc_now
from mqi.transport.base import HostRefused, HostUnreachable

log = logging.getLogger(__name__)

HEALTH_FORMAT = 1
HEALTH_SUBDIR = "hosts"
_SAFE_HOST = re.compile(NAME_PATTERN)
#: errors that say the host itself is out of reach; a command timing out or failing does not
HOST_DOWN_ERRORS = (HostUnreachable, HostRefused)


@dataclass(frozen=True)
class RecheckPolicy:
    """How long a host marked down is left alone before it is tried again."""

    first_seconds: float = 30.0
    max_seconds: float = 600.0

    def interval(self, failures: int, transient: bool) -> timedelta:
        if not transient:
            return timedelta(seconds=self.max_seconds)
        # the exponent is capped: a host down for weeks must not overflow the float
        doubled = self.first_seconds * 2 ** min(max(0, failures - 1), 32)
        return timedelta(seconds=min(doubled, self.max_seconds))


DEFAULT_RECHECK = RecheckPolicy()


@dataclass(frozen=True)
class HostHealth:
    host: str
    reachable: bool | None  # None: never recorded, assumed reachable
    since: datetime | None = None  # when the host became reachable or unreachable
    reason: str | None = None  # why it is unreachable (the transport error's message)
    last_checked: datetime | None = None
    failures: int = 0  # consecutive failures recorded, one per back-off window
    transient: bool = True  # False: refused credentials or host key, a person must act

    def next_check(self, policy: RecheckPolicy = DEFAULT_RECHECK) -> datetime | None:
        """When a host marked down is tried again; None when it is not marked down."""
        if self.reachable is not False or self.last_checked is None:
            return None
        return self.last_checked + policy.interval(self.failures, self.transient)

    def usable(self, now: datetime, policy: RecheckPolicy = DEFAULT_RECHECK) -> bool:
        """Placement may use the host: not marked down, or due for a new try."""
        retry_at = self.next_check(policy)
        return retry_at is None or now >= retry_at

    @property
    def needs_operator(self) -> bool:
        """Marked down by a failure a retry cannot fix (host key, credentials)."""
        return self.reachable is False and not self.transient

    @property
    def condition(self) -> str:
        """'reachable', 'unreachable' (a network fault), 'refused' (needs an operator) or
        'unknown' (never recorded)."""
        if self.reachable is None:
            return "unknown"
        if self.reachable:
            return "reachable"
        return "refused" if self.needs_operator else "unreachable"


@dataclass(frozen=True)
class Recorded:
    """A host's health as just recorded, and whether it is news (see the module's notes)."""

    health: HostHealth
    news: bool


def health_file(state_dir: Path, host: str) -> Path:
    if not _SAFE_HOST.match(host):
        raise ValueError(f"host name {host!r} cannot name a health file")
    return Path(state_dir) / HEALTH_SUBDIR / f"{host}.json"


def host_health(state_dir: Path, host: str) -> HostHealth:
    """What was last recorded for `host`; reachable None when nothing was."""
    path = health_file(state_dir, host)
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
        if document.pop("format") != HEALTH_FORMAT or document["host"] != host:
            raise ValueError("another format or host")
        for name in ("since", "last_checked"):
            document[name] = document[name] and datetime.fromisoformat(document[name])
        return HostHealth(**document)
    except FileNotFoundError:
        return HostHealth(host, reachable=None)
    except (ValueError, KeyError, TypeError) as error:
        # Damaged or foreign: as good as absent, and the next record replaces it.
        log.warning("ignoring unreadable host health file %s: %s", path, error)
        return HostHealth(host, reachable=None)


def record_host_ok(state_dir: Path, host: str, *, now: datetime | None = None) -> HostHealth:
    return _record_ok(state_dir, host, now or utc_now()).health


def _record_ok(state_dir: Path, host: str, now: datetime) -> Recorded:
    with _locked(state_dir, host) as previous:
        since = previous.since if previous.reachable is True else now
        if previous.reachable is False:
            log.info("host %s is reachable again (down since %s)", host, previous.since)
        health = _store(state_dir, HostHealth(host, True, since, None, now))
        return Recorded(health, news=previous.reachable is not True)


def record_host_failure(
    state_dir: Path,
    host: str,
    reason: str,
    transient: bool,
    *,
    now: datetime | None = None,
    policy: RecheckPolicy = DEFAULT_RECHECK,
) -> HostHealth:
    """Mark `host` down. Failures seen by several callers within one back-off window (they all
    tried at once) count as one, so the interval does not grow with the number of callers."""
    return _record_failure(state_dir, host, reason, transient, now or utc_now(), policy).health


def _record_failure(
    state_dir: Path, host: str, reason: str, transient: bool, now: datetime, policy: RecheckPolicy
) -> Recorded:
    with _locked(state_dir, host) as previous:
        news = previous.reachable is not False or previous.transient != transient
        if news:
            log.warning("host %s marked %s: %s", host, "refused" if not transient else "unreachable", reason)
        if previous.reachable is False and now < previous.next_check(policy):
            health = replace(previous, reason=reason, transient=transient)
        elif previous.reachable is not False:
            health = HostHealth(host, False, now, reason, now, 1, transient)
        else:
            health = HostHealth(host, False, previous.since, reason, now, previous.failures + 1, transient)
        return Recorded(_store(state_dir, health), news)


def record_host_call(
    state_dir: Path,
    host: str,
    error: Exception | None,
    *,
    now: datetime | None = None,
    policy: RecheckPolicy = DEFAULT_RECHECK,
) -> Recorded | None:
    """Record how a call to `host` went (error None: it answered). None when the error does not
    say the host is out of reach (HOST_DOWN_ERRORS: a timed-out or failed command does not): its
    health stays as it was."""
    now = now or utc_now()
    if error is None:
        return _record_ok(state_dir, host, now)
    if not isinstance(error, HOST_DOWN_ERRORS):
        return None
    return _record_failure(state_dir, host, str(error), error.transient, now, policy)


def awaiting_operator(state_dir: Path, host: str, *, now: datetime | None = None) -> bool:
    """The host was refused (host key, credentials) and is not due for its next check: it is
    left alone until then (or until `mqi hosts` finds it fixed)."""
    health = host_health(state_dir, host)
    return health.needs_operator and not health.usable(now or utc_now())


def reachable_hosts(
    state_dir: Path,
    names: Iterable[str],
    *,
    now: datetime | None = None,
    policy: RecheckPolicy = DEFAULT_RECHECK,
) -> set[str]:
    """The hosts placement may use: never recorded, reachable, or due for a new try."""
    now = now or utc_now()
    return {name for name in names if host_health(state_dir, name).usable(now, policy)}


@contextlib.contextmanager
def _locked(state_dir: Path, host: str) -> Iterator[HostHealth]:
    path = health_file(state_dir, host)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A new open file each time: flock excludes other open files, so threads too.
    with open(path.with_suffix(".lock"), "a") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        yield host_health(state_dir, host)


def _store(state_dir: Path, health: HostHealth) -> HostHealth:
    document = {"format": HEALTH_FORMAT, **asdict(health)}
    for name in ("since", "last_checked"):
        document[name] = document[name] and document[name].isoformat()
    write_json_atomic(health_file(state_dir, health.host), document)
    return health
