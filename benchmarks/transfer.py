"""Case transfer speed: our verified tar stream against OpenSSH `scp -r`, same sshd, same run.

Two data sets, one 200 MB file and 2,000 files of 50 KB, uploaded and downloaded both ways;
each figure is the median of `repeat` runs. Our transfer reuses its one SSH connection (the
design: one connection per host per process); scp opens a new one each time, which the
time of `ssh host true` shows.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from benchmarks.harness import REMOTE_PYTHON, Lab, median, timings
from benchmarks.report import Row, Section, ratio
from mqi.transfer import download_results, upload_case
from mqi.transport.ssh import SshTransport

TIMEOUT = 600
TARGET_RATIO = 1.0


def make_data(root: Path, big_mb: int, small_count: int) -> dict[str, Path]:
    big = root / "big"
    big.mkdir(parents=True)
    with (big / "one.bin").open("wb") as out:
        for _ in range(big_mb):
            out.write(os.urandom(1024 * 1024))
    small = root / "small"
    small.mkdir()
    for index in range(small_count):
        (small / f"spot_{index:05d}.dat").write_bytes(os.urandom(50 * 1024))
    return {f"one file of {big_mb} MB": big, f"{small_count:,} files of 50 KB": small}


class TransferBench:
    def __init__(self, lab: Lab, repeat: int):
        self.server = lab.sshd
        self.scratch = lab.root / "copies"
        self.scratch.mkdir(parents=True, exist_ok=True)
        self.repeat = repeat
        self.transport = SshTransport(**self.server.transport_params("bench-transfer"))
        self.transport.run(["true"], timeout=30).check()  # open the shared connection once

    def timed(self, action: Callable[[Path], None], label: str) -> float:
        """Seconds `action` takes to make a copy at a fresh path; the copy is removed after,
        untimed, so that no run pays for the writeback of an earlier run's data."""
        path = self.scratch / label
        shutil.rmtree(path, ignore_errors=True)  # left by an interrupted run: scp -r would copy into it
        started = time.perf_counter()
        action(path)
        seconds = time.perf_counter() - started
        shutil.rmtree(path, ignore_errors=True)
        return seconds

    def side_by_side(self, ours: Callable[[Path], None], theirs: Callable[[Path], None]) -> tuple[float, float]:
        """Medians of `repeat` runs each, alternating, so that a machine whose speed drifts
        during the run (other load, page cache) weighs on both alike."""
        runs: tuple[list[float], list[float]] = ([], [])
        for _ in range(self.repeat):
            runs[0].append(self.timed(ours, "ours"))
            runs[1].append(self.timed(theirs, "scp"))
        return median(runs[0]), median(runs[1])

    def scp(self, source: str, dest: str) -> None:
        subprocess.run(
            ["scp", "-q", "-r", "-P", str(self.server.port),
             *self.server.openssh_client_options(), source, dest],
            check=True,
        )  # fmt: skip

    def remote(self, path: Path) -> str:
        return f"{self.server.username}@{self.server.hostname}:{path}"

    def upload(self, folder: Path, dest: Path) -> None:
        """As a case's first upload: nothing of it can be on the host yet, so the host is not asked."""
        upload_case(self.transport, folder, str(dest), timeout=TIMEOUT, python=REMOTE_PYTHON, may_be_there=False)

    def download(self, folder: Path, dest: Path) -> None:
        download_results(self.transport, str(folder), dest, timeout=TIMEOUT, python=REMOTE_PYTHON)

    def rows(self, name: str, folder: Path) -> list[Row]:
        timed = {
            "upload": self.side_by_side(lambda dest: self.upload(folder, dest),
                                        lambda dest: self.scp(str(folder), self.remote(dest))),
            "download": self.side_by_side(lambda dest: self.download(folder, dest),
                                          lambda dest: self.scp(self.remote(folder), str(dest))),
        }
        return [
            Row(f"{way} {name}", f"{ours:.2f} s", f"at most {TARGET_RATIO:.1f} x scp", ours <= TARGET_RATIO * scp,
                peer=f"{scp:.2f} s", ratio=ratio(ours, scp))
            for way, (ours, scp) in timed.items()
        ]

    def connection_cost(self) -> float:
        command = ["ssh", "-p", str(self.server.port), *self.server.openssh_client_options(),
                   f"{self.server.username}@{self.server.hostname}", "true"]  # fmt: skip
        return median(timings(lambda n: subprocess.run(command, check=True), self.repeat))


def run(lab: Lab, *, repeat: int = 5, big_mb: int = 200, small_count: int = 2000) -> Section:
    bench = TransferBench(lab, repeat)
    try:
        rows = []
        for name, folder in make_data(lab.root / "data", big_mb, small_count).items():
            rows += bench.rows(name, folder)
        cipher = bench.transport._client.get_transport().remote_cipher
        notes = [
            f"Median of {repeat} runs each way, ours and scp taking turns, to a private sshd on 127.0.0.1; "
            "the copies land on the same disk and each is deleted (untimed) before the next run. "
            f"Our cipher: {cipher}; connections we opened for all {4 * repeat} transfers: "
            f"{bench.transport.connections_opened}.",
            f"scp opens a new connection for each copy: `ssh host true` takes {bench.connection_cost():.2f} s, "
            "included in every scp figure. Ours verifies a sha256 manifest at both ends; scp checks nothing "
            "beyond the SSH MAC.",
        ]
    finally:
        bench.transport.close()
    return Section("Upload and download of a case (ours vs OpenSSH scp -r)", rows, notes)
