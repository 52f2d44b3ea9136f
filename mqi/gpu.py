"""What the GPUs of a host are doing, read from `nvidia-smi` through the host's own transport.

Two CSV queries (`--format=csv,noheader,nounits`): one line per GPU, one line per compute
process. nvidia-smi separates fields with ", " and writes values it cannot read as `[N/A]`,
`[Not Supported]` and the like; those become None. A product or process name may itself hold
a comma, so the one free-text field of a line takes whatever the fixed fields leave over.

A host without nvidia-smi (a CPU-only test box, a wrong path) gives a report that says so,
not an error: only a transport failure, which says the host itself is in trouble, is raised.

A process is "ours" when its environment carries `MQI_CASE_UID`, which every task we submit
gets (see `casework.add_task`); any other compute process on a GPU is foreign, e.g. a
colleague's job that would slow ours down or run it out of memory.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from datetime import datetime

from mqi.timefmt import utc_now
from mqi.transport.base import CommandResult, Transport

GPU_FIELDS = ("index", "uuid", "name", "utilization.gpu", "memory.used", "memory.total")
PROCESS_FIELDS = ("gpu_uuid", "pid", "process_name", "used_memory")
CSV_FORMAT = "--format=csv,noheader,nounits"
OUR_PROCESS_MARKER = "MQI_CASE_UID"
MAX_MESSAGE = 300  # characters of nvidia-smi's own words kept in a report
_NOT_FOUND_CODES = {
    126,
    127,
}  # what the remote shell returns for a missing or non-executable program


@dataclass(frozen=True)
class Gpu:
    index: int
    uuid: str
    name: str
    utilization_percent: int | None
    memory_used_mib: int | None
    memory_total_mib: int | None


@dataclass(frozen=True)
class GpuProcess:
    gpu_uuid: str
    pid: int | None
    name: str
    used_memory_mib: int | None
    ours: bool = False  # started for one of our cases


@dataclass(frozen=True)
class GpuReport:
    """The GPUs and compute processes of one host, or `problem` saying why there are none."""

    host: str
    gpus: tuple[Gpu, ...] = ()
    processes: tuple[GpuProcess, ...] = ()
    problem: str | None = None
    checked_at: datetime = field(default_factory=utc_now)

    def foreign_on(self, gpu: Gpu) -> tuple[GpuProcess, ...]:
        """The compute processes on `gpu` that are not ours."""
        return tuple(p for p in self.processes if p.gpu_uuid == gpu.uuid and not p.ours)


class NvidiaSmiOutputError(ValueError):
    """A line of nvidia-smi output that is not the CSV we asked for."""


# -- parsing ------------------------------------------------------------------------------


def parse_gpus(text: str) -> tuple[Gpu, ...]:
    """The output of `--query-gpu=<GPU_FIELDS>` in CSV without header and units."""
    gpus = []
    for line in _lines(text):
        index, uuid, name, utilization, used, total = _fields(line, len(GPU_FIELDS), free_text=2)
        number = _number(index)
        if number is None:
            raise NvidiaSmiOutputError(f"no GPU index in {line!r}")
        gpus.append(Gpu(number, uuid, name, _number(utilization), _number(used), _number(total)))
    return tuple(gpus)


def parse_processes(text: str) -> tuple[GpuProcess, ...]:
    """The output of `--query-compute-apps=<PROCESS_FIELDS>` in CSV without header and units."""
    processes = []
    for line in _lines(text):
        uuid, pid, name, used = _fields(line, len(PROCESS_FIELDS), free_text=2)
        processes.append(GpuProcess(uuid, _number(pid), name, _number(used)))
    return tuple(processes)


def _lines(text: str) -> list[str]:
    # "No running processes found" is what some versions print instead of an empty list.
    return [
        line.strip()
        for line in text.splitlines()
        if line.strip() and not line.strip().startswith("No running processes found")
    ]


def _fields(line: str, count: int, *, free_text: int) -> list[str]:
    """Split on nvidia-smi's ", "; extra separators belong to the field at `free_text`."""
    parts = [part.strip() for part in line.split(", ")]
    if len(parts) < count:  # a plain-comma CSV, from a wrapper or another version
        parts = [part.strip() for part in line.split(",")]
    if len(parts) < count:
        raise NvidiaSmiOutputError(f"expected {count} fields, found {len(parts)} in {line!r}")
    extra = len(parts) - count
    merged = ", ".join(parts[free_text : free_text + extra + 1])
    return [*parts[:free_text], merged, *parts[free_text + extra + 1 :]]


def _number(value: str) -> int | None:
    """An integer field; None for [N/A], [Not Supported], [Unknown Error] and the like."""
    try:
        return int(float(value))
    except (ValueError, OverflowError):
        return None


# -- querying a host ------------------------------------------------------------------------


def query_gpus(transport: Transport, timeout: float, nvidia_smi: str = "nvidia-smi") -> GpuReport:
    """Both queries over `transport` (its existing connection). Raises only TransportError."""
    gpu_result = _run(transport, nvidia_smi, "--query-gpu=" + ",".join(GPU_FIELDS), timeout)
    if gpu_result.exit_code != 0:
        return GpuReport(transport.host, problem=_failure_text(nvidia_smi, gpu_result))
    process_result = _run(
        transport, nvidia_smi, "--query-compute-apps=" + ",".join(PROCESS_FIELDS), timeout
    )
    if process_result.exit_code != 0:
        return GpuReport(transport.host, problem=_failure_text(nvidia_smi, process_result))
    try:
        gpus, processes = parse_gpus(gpu_result.out), parse_processes(process_result.out)
    except NvidiaSmiOutputError as error:
        return GpuReport(transport.host, problem=f"unexpected nvidia-smi output: {error}")
    ours = our_pids(transport, [p.pid for p in processes if p.pid is not None], timeout)
    return GpuReport(transport.host, gpus, tuple(replace(p, ours=p.pid in ours) for p in processes))


def cached_gpu_report(
    cache: GpuCache, transport: Transport, nvidia_smi: str, timeout: float
) -> GpuReport:
    """The host's report, queried at most once per the cache's interval (for placement)."""
    return cache.get(transport.host, lambda: query_gpus(transport, timeout, nvidia_smi))


def _run(transport: Transport, nvidia_smi: str, query: str, timeout: float) -> CommandResult:
    return transport.run([nvidia_smi, query, CSV_FORMAT], timeout=timeout)


def _failure_text(nvidia_smi: str, result: CommandResult) -> str:
    if result.exit_code in _NOT_FOUND_CODES:
        return f"nvidia-smi not available ({nvidia_smi!r} not found or not executable)"
    printed = " ".join((result.out + " " + result.err).split()) or "no output"
    if len(printed) > MAX_MESSAGE:
        printed = printed[:MAX_MESSAGE] + "..."
    return f"nvidia-smi failed with exit code {result.exit_code}: {printed}"


def our_pids(transport: Transport, pids: Iterable[int], timeout: float) -> set[int]:
    """Those of `pids` whose environment holds OUR_PROCESS_MARKER (readable: same user).

    A process of another user, or one that has ended, is not ours."""
    wanted = sorted(set(pids))
    if not wanted:
        return set()
    script = (
        'for pid; do tr "\\0" "\\n" < "/proc/$pid/environ" 2>/dev/null'
        f' | grep -q "^{OUR_PROCESS_MARKER}=" && echo "$pid"; done; exit 0'
    )
    result = transport.run(
        ["sh", "-c", script, "mqi-gpu-owners", *map(str, wanted)], timeout=timeout
    )
    return {int(line) for line in result.check().out.split() if line.isdigit()}


# -- placement ------------------------------------------------------------------------------


def in_devices(gpu: Gpu, devices: str | None) -> bool:
    """Whether a group's CUDA_VISIBLE_DEVICES names this GPU: by index ("0,1") or by UUID
    (or a unique start of it, as CUDA allows); None means every GPU.

    Indices are nvidia-smi's (PCI bus order); CUDA counts the same way only with
    CUDA_DEVICE_ORDER=PCI_BUS_ID on the host."""
    if devices is None:
        return True
    for entry in (part.strip() for part in devices.split(",")):
        if entry.isdigit() and gpu.index == int(entry):
            return True
        if entry and not entry.isdigit() and gpu.uuid.startswith(entry):
            return True
    return False


def foreign_processes(
    report: GpuReport, devices: str | None, our_pids: Iterable[int] = ()
) -> tuple[GpuProcess, ...]:
    """Compute processes on the group's GPUs that are not ours (neither marked `ours` by the
    query nor in `our_pids`): empty means the GPUs are free of other people's work, or the
    report has no GPU data to tell."""
    ours = set(our_pids)
    uuids = {gpu.uuid for gpu in report.gpus if in_devices(gpu, devices)}
    return tuple(
        p for p in report.processes if p.gpu_uuid in uuids and not p.ours and p.pid not in ours
    )


# -- once per poll interval ---------------------------------------------------------------


class GpuCache:
    """The latest report per host, asked for at most once per `interval` seconds.

    Threads asking for the same host while a query runs wait for its answer. Failures are not
    cached: the next caller asks again."""

    def __init__(self, interval: float, *, clock: Callable[[], float] = time.monotonic):
        self.interval = interval
        self._clock = clock
        self._lock = threading.Lock()
        self._host_locks: dict[str, threading.Lock] = {}
        self._reports: dict[str, tuple[float, GpuReport]] = {}

    def get(self, host: str, query: Callable[[], GpuReport]) -> GpuReport:
        with self._lock:
            host_lock = self._host_locks.setdefault(host, threading.Lock())
        with host_lock:
            cached = self._reports.get(host)
            if cached is not None and 0 <= self._clock() - cached[0] < self.interval:
                return cached[1]
            report = query()
            self._reports[host] = (self._clock(), report)
            return report
