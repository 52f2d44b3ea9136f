"""A site at run time: settings, the ledger, and one transport and queue per configured host.

Everything a flow needs to reach a host comes from here, so that every case in one process
shares one connection and one status poll per host.
"""

from __future__ import annotations

import logging
import posixpath
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cached_property
from pathlib import Path

from mqi.arrival_line import ArrivalGate, ArrivalLine, ExpectedArrivals
from mqi.errors import ConfigError
from mqi.gpu import GpuCache
from mqi.group_sightings import record_seen
from mqi.host_health import HostHealth, record_host_call
from mqi.ledger.states import SLOT_STATES
from mqi.ledger.store import Ledger
from mqi.polling import SharedLogTails, SharedStatus
from mqi.queue.base import Queue, QueueSnapshot
from mqi.settings import GroupSettings, HostSettings, Settings
from mqi.transport.base import Transport

log = logging.getLogger(__name__)

# Between rounds of the cases waiting for a GPU slot: short, since only cases the inbox scan
# admitted (as many as the groups hold) wait, and a freed slot should not stay idle. A slot
# given back in this process starts a round at once.
SLOT_RETRY_SECONDS = 1.0
# Progress: the last lines of running tasks, read every third poll and at most every 5 s.
PROGRESS_EVERY_POLLS, PROGRESS_MIN_SECONDS, PROGRESS_LINES = 3, 5.0, 20


@dataclass(frozen=True)
class Placement:
    host: HostSettings
    group: GroupSettings

    @property
    def limit_name(self) -> str:
        """The Prefect global concurrency limit that models this GPU group."""
        return gpu_limit_name(self.host.name, self.group.name)


def gpu_limit_name(host: str, group: str) -> str:
    return f"mqi-gpu:{host}:{group}"


class Site:
    def __init__(self, settings: Settings):
        self.settings = settings
        self._lock = threading.RLock()  # queue() builds its transport under it
        self._transports: dict[str, Transport] = {}
        self._queues: dict[str, Queue] = {}
        self._statuses: dict[str, SharedStatus] = {}
        self._log_tails: dict[str, SharedLogTails] = {}
        self._upload_gates: dict[str, ArrivalGate] = {}
        #: cases started in this process that have not reached an upload gate yet
        self.expected_arrivals = ExpectedArrivals()
        #: the cases of this process take GPU slots and reach the queues in arrival order
        self.arrival_line = ArrivalLine(retry_seconds=SLOT_RETRY_SECONDS)
        self.gpu_cache = GpuCache(interval=settings.case.poll_seconds)
        #: called with a HostHealth when a host becomes reachable, unreachable or refused
        self.host_listeners: list[Callable[[HostHealth], None]] = []
        #: A case on a host that needs an operator (its key changed, our credentials refused)
        #: waits for the fix, checked at the host-health back-off. False where a user waits at
        #: the terminal (`mqi submit`): the run ends at once with the host's message instead.
        self.waits_for_operator = True

    @cached_property
    def ledger(self) -> Ledger:
        ledger = Ledger.open(self.settings.ledger.url.get_secret_value())
        ledger.sync_gpu_groups((h.name, g.name, g.capacity, _devices(g)) for h in self.settings.hosts for g in h.groups)
        ledger.transition_listeners.append(self._slot_freed)
        return ledger

    def _slot_freed(self, case, from_state, attempt_id) -> None:
        """A slot given back in this process: the cases waiting here try again at once."""
        if from_state in SLOT_STATES and case.state not in SLOT_STATES:
            self.arrival_line.slot_given_back()

    def placement(self, host: str, group: str) -> Placement:
        host_settings = self.settings.host(host)
        for group_settings in host_settings.groups:
            if group_settings.name == group:
                return Placement(host_settings, group_settings)
        names = ", ".join(g.name for g in host_settings.groups)
        raise ConfigError([f"host {host!r} has no group {group!r} (configured: {names})"])

    def workdir(self, host: HostSettings) -> str:
        if host.transport == "local":
            return str(Path(host.workdir).expanduser().resolve())
        return host.workdir

    def remote_case_dir(self, host: HostSettings, uid: str) -> str:
        return posixpath.join(self.workdir(host), uid)

    def transport(self, host_name: str) -> Transport:
        with self._lock:
            if host_name not in self._transports:
                self._transports[host_name] = _make_transport(self.settings.host(host_name))
            return self._transports[host_name]

    def queue(self, host_name: str) -> Queue:
        with self._lock:
            if host_name not in self._queues:
                self._queues[host_name] = self._make_queue(self.settings.host(host_name))
            return self._queues[host_name]

    def status(self, host_name: str) -> SharedStatus:
        queue = self.queue(host_name)
        with self._lock:
            if host_name not in self._statuses:
                self._statuses[host_name] = SharedStatus(
                    queue,
                    cache_dir=self.settings.state_dir / "status-cache",
                    max_age=self.settings.case.poll_seconds,
                    on_call=lambda error: self.note_host_call(host_name, error),
                    on_snapshot=lambda snapshot, asked, answered: self.note_groups_seen(
                        host_name, snapshot, datetime.fromtimestamp(asked, UTC), datetime.fromtimestamp(answered, UTC)
                    ),
                )
            return self._statuses[host_name]

    def log_tails(self, host_name: str) -> SharedLogTails:
        """Progress lines of the running tasks this process waits on: one read per host."""
        queue = self.queue(host_name)
        with self._lock:
            if host_name not in self._log_tails:
                every = max(PROGRESS_EVERY_POLLS * self.settings.case.poll_seconds, PROGRESS_MIN_SECONDS)
                self._log_tails[host_name] = SharedLogTails(queue, max_age=every, lines=PROGRESS_LINES)
            return self._log_tails[host_name]

    def upload_gate(self, host_name: str) -> ArrivalGate:
        """Uploads of this process to the host: one at a time, in arrival order."""
        with self._lock:
            return self._upload_gates.setdefault(host_name, ArrivalGate(self.expected_arrivals))

    def note_host_call(self, host_name: str, error: Exception | None) -> HostHealth | None:
        """Keep the host's health (reachable or not, and why) for placement and `mqi hosts`, and
        tell the listeners when it is news (it came back, went away, or now needs an operator).
        Returns the health recorded; None when the error says nothing about the host."""
        recorded = record_host_call(self.settings.state_dir, host_name, error)
        if recorded is None:
            return None
        if recorded.news:
            for listener in self.host_listeners:
                listener(recorded.health)
        return recorded.health

    def note_groups_seen(self, host_name: str, snapshot: QueueSnapshot, asked_at: datetime,
                         answered_at: datetime) -> None:
        """Keep what the host's groups were doing during one status call, asked and answered at
        these times: it tells a restart's pause from a person's."""
        try:
            record_seen(self.settings.state_dir, host_name, snapshot.groups, asked_at, answered_at)
        except OSError as exc:  # best effort: the previous record stays, a little older
            log.warning("host %s: could not record its groups' status: %s", host_name, exc)

    def _make_queue(self, host: HostSettings) -> Queue:
        _require_resolved(host)
        if host.queue == "local":
            from mqi.queue.local import LocalQueue

            groups = {g.name: g.slots for g in host.groups}
            return LocalQueue(self.settings.state_dir / "queue" / host.name, groups, host=host.name)
        from mqi.queue.pueue import PueueQueue

        return PueueQueue(self.transport(host.name), pueue=host.pueue, timeout=host.command_timeout,
                          pid_file=host.pueue_pid_file)

    def close(self) -> None:
        for transport in self._transports.values():
            transport.close()


def _devices(group: GroupSettings) -> list[str]:
    return [] if group.devices is None else [d.strip() for d in str(group.devices).split(",")]


def _require_resolved(host: HostSettings) -> None:
    """A host that names a saved block must have been loaded from it, never run on defaults."""
    if host.block is not None:
        raise ConfigError([f"hosts: {host.name!r} names the Prefect block {host.block!r}, which was not loaded"])


def _make_transport(host: HostSettings) -> Transport:
    _require_resolved(host)
    if host.transport == "local":
        from mqi.transport.local import LocalTransport

        return LocalTransport(host=host.name)
    from mqi.transport.ssh import shared_ssh_transport

    return shared_ssh_transport(
        host=host.name,
        hostname=host.hostname,
        port=host.port,
        username=host.username,
        key_file=host.key_file.expanduser() if host.key_file else None,
        key_passphrase=host.key_passphrase,
        password=host.password,
        known_hosts=host.known_hosts.expanduser(),
        accept_unknown_host_keys=host.accept_unknown_host_keys,
        connect_timeout=host.connect_timeout,
    )
