"""Status polling of one host holding 200 tasks: calls, bytes and time per poll.

A fake pueue (tests/support/fake_pueue) gets --tasks tasks in one group (--running of them
running, the rest queued), submitted by PueueQueue, so each stores the minimal environment.
The host is then polled --polls times with `PueueQueue.snapshot()`, through a private sshd
on 127.0.0.1 (one shared SSH connection) and locally. Figures are medians. For comparison
the same number of tasks is added by a plain `pueue add` that stores the caller's whole
environment, which is what the output would weigh without `env -i`.

    .venv/bin/python benchmarks/bench_status_poll.py [--tasks 200] [--polls 20] [--running 4]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mqi.queue.base import SubmitRequest  # noqa: E402
from mqi.queue.pueue import PueueQueue  # noqa: E402
from mqi.queue.pueue_json import parse_status  # noqa: E402
from mqi.transport.base import Transport  # noqa: E402
from mqi.transport.local import LocalTransport  # noqa: E402
from mqi.transport.ssh import SshTransport  # noqa: E402
from tests.support.pueue_fixtures import FakePueue, install_fake_pueue  # noqa: E402
from tests.support.sshd import OpenSshServer  # noqa: E402

GROUP = "gpu0"


def fill_with_tasks(fake: FakePueue, workdir: Path, count: int) -> None:
    queue = PueueQueue(LocalTransport("setup"), pueue=str(fake.bin))
    for number in range(count):
        queue.submit(
            SubmitRequest(
                label=f"mqi-case{number:04d}-a1",
                group=GROUP,
                workdir=str(workdir),
                command="sleep 600",
                env={"CUDA_VISIBLE_DEVICES": str(number % 4), "MQI_CASE_UID": f"case{number:04d}"},
            )
        )


def measure_polls(fake: FakePueue, transport: Transport, polls: int) -> dict[str, float]:
    queue = PueueQueue(transport, pueue=str(fake.bin))
    queue.snapshot()  # opens the connection: a poller keeps it open between polls
    calls_before = len(fake.calls())
    poll_ms = []
    for _ in range(polls):
        started = time.perf_counter()
        snapshot = queue.snapshot()
        poll_ms.append((time.perf_counter() - started) * 1000)
        assert len(snapshot.tasks) > 0, "the host should hold tasks"
    return {
        "calls per poll": (len(fake.calls()) - calls_before) / polls,
        "ms per poll": statistics.median(poll_ms),
    }


def measure_output(fake: FakePueue, polls: int) -> tuple[int, float]:
    """Bytes of one `status --json` and the median ms to parse them."""
    output = fake.run("status", "--json").stdout
    parse_ms = []
    for _ in range(polls):
        started = time.perf_counter()
        parse_status(output, "bench-host")
        parse_ms.append((time.perf_counter() - started) * 1000)
    return len(output.encode()), statistics.median(parse_ms)


def whole_environment_bytes(root: Path, workdir: Path, count: int) -> int:
    """Bytes of `status --json` when every task stores the caller's whole environment."""
    fake = install_fake_pueue(root, groups={GROUP: 0})
    fake.start_daemon()
    try:
        fake.pause_group(GROUP)  # nothing needs to run: only the stored tasks count
        for number in range(count):
            result = fake.run("add", "-p", "-g", GROUP, "-w", str(workdir), "--", "sleep 600")
            assert result.returncode == 0, result.stderr
        return len(fake.run("status", "--json").stdout.encode())
    finally:
        fake.stop_daemon()
        fake.kill_leftover_tasks()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=200)
    parser.add_argument("--polls", type=int, default=20)
    parser.add_argument("--running", type=int, default=4)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-status-") as scratch:
        root = Path(scratch)
        workdir = root / "case"
        workdir.mkdir()
        fake = install_fake_pueue(root / "pueue", groups={GROUP: args.running})
        fake.start_daemon()
        (root / "sshd").mkdir()
        server = OpenSshServer(root / "sshd")
        server.start()
        ssh = SshTransport(**server.transport_params("bench-host"))
        try:
            fill_with_tasks(fake, workdir, args.tasks)
            results = {
                "ssh (one shared connection)": measure_polls(fake, ssh, args.polls),
                "local": measure_polls(fake, LocalTransport("bench-host"), args.polls),
            }
            size, parse_ms = measure_output(fake, args.polls)
        finally:
            ssh.close()
            server.stop()
            fake.stop_daemon()
            fake.kill_leftover_tasks()
        full_env = whole_environment_bytes(root / "pueue-full-env", workdir, args.tasks)

    print(f"{args.tasks} tasks on one host ({args.running} running), median of {args.polls} polls")
    print(f"bytes per poll: {size:,}; parsing them: {parse_ms:.1f} ms")
    print(f"{'transport':<30}{'remote calls/poll':>18}{'ms/poll (parse included)':>26}")
    for name, figures in results.items():
        print(f"{name:<30}{figures['calls per poll']:>18.0f}{figures['ms per poll']:>26.1f}")
    print(f"bytes per poll if each task stored the caller's whole environment: {full_env:,}")


if __name__ == "__main__":
    main()
