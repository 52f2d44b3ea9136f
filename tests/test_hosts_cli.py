"""`mqi hosts` over two real sshd hosts, each with its own pueue stand-in; one host is down."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import UTC, timedelta
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from mqi.cli import app
from mqi.group_sightings import note_pause_cause
from mqi.host_health import host_health, reachable_hosts
from mqi.host_report import artifact_rows, health_text, host_reports
from mqi.queue.base import SubmitRequest
from mqi.queue.pueue import PueueQueue
from mqi.settings import Settings
from mqi.site import Site
from mqi.timefmt import utc_now
from mqi.transport.local import LocalTransport
from tests.support.nvidia_smi import (
    gpu,
    install_fake_nvidia_smi,
    process,
    start_compute_process,
    stop_processes,
)
from tests.support.pueue_fixtures import FakePueue, install_fake_pueue
from tests.support.sshd import generate_key

GROUPS = [
    {"name": "gpu0", "slots": 1, "devices": "0"},
    {"name": "gpu1", "slots": 2, "devices": "1"},  # paused on the host
    {"name": "gpu9", "slots": 1, "devices": "9"},  # not created on the host
]


@dataclass
class TwoHosts:
    hosts: list[dict]  # host entries of the settings: live first, then down
    down_server: object  # the stopped OpenSshServer
    ours: subprocess.Popen  # a GPU process started for a case
    foreign: subprocess.Popen  # somebody else's GPU process

    @property
    def names(self) -> tuple[str, str]:
        return self.hosts[0]["name"], self.hosts[1]["name"]


def host_entry(name: str, server, pueue: FakePueue, nvidia_smi: Path, workdir: Path) -> dict:
    return {"name": name, "transport": "ssh", "queue": "pueue", "hostname": server.hostname,
            "port": server.port, "username": server.username, "key_file": str(server.key_file),
            "known_hosts": str(server.known_hosts), "pueue": str(pueue.bin),
            "nvidia_smi": str(nvidia_smi), "workdir": str(workdir), "groups": GROUPS}  # fmt: skip


def submit_two_tasks(pueue: FakePueue, workdir: Path) -> None:
    """gpu0 has one slot on the host: the first task runs, the second waits."""
    queue = PueueQueue(LocalTransport("setup"), pueue=str(pueue.bin))
    for n in (1, 2):
        queue.submit(SubmitRequest(f"mqi-case{n}-a1", "gpu0", str(workdir), "sleep 300"))
    deadline = time.monotonic() + 20
    while not any("Running" in task["status"] for task in pueue.status()["tasks"].values()):
        assert time.monotonic() < deadline, "the first task did not start"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def two_hosts(sshd_factory, tmp_path_factory):
    root = tmp_path_factory.mktemp("two-hosts")
    ours, foreign = start_compute_process(ours=True), start_compute_process(ours=False)
    smi = install_fake_nvidia_smi(
        root / "smi",
        [
            gpu(0, utilization=35, used=1000),
            gpu(1, "NVIDIA A100 [PCIe]", utilization="[N/A]", used=20000),
        ],
        [
            process(0, ours.pid, "/opt/moqui/bin/moqui", 900),
            process(1, foreign.pid, "/usr/bin/python3", 19000),
        ],
    )
    pueues = [
        install_fake_pueue(root / f"pueue-{n}", groups={"gpu0": 1, "gpu1": 2}) for n in (1, 2)
    ]
    servers = [sshd_factory(), sshd_factory()]
    try:
        for pueue in pueues:
            pueue.start_daemon()
        (root / "work").mkdir()
        submit_two_tasks(pueues[0], root / "work")
        pueues[0].pause_group("gpu1")
        servers[1].stop()
        hosts = [
            host_entry(name, server, pueue, smi.bin, root / "work")
            for name, server, pueue in zip(("live", "down"), servers, pueues, strict=True)
        ]
        yield TwoHosts(hosts, servers[1], ours, foreign)
    finally:
        for pueue in pueues:
            try:
                pueue.stop_daemon()
            finally:
                pueue.kill_leftover_tasks()
        stop_processes(ours, foreign)


def settings_data(tmp_path: Path, hosts: list[dict]) -> dict:
    ledger = {"url": f"sqlite:///{tmp_path / 'mqi.db'}"}
    return {
        "state_dir": str(tmp_path / ".mqi"),
        "timezone": "UTC",
        "ledger": ledger,
        "hosts": hosts,
    }


def settings_for(tmp_path: Path, hosts: list[dict]) -> Settings:
    return Settings(**settings_data(tmp_path, hosts))


def config_file(tmp_path: Path, hosts: list[dict]) -> Path:
    path = tmp_path / "mqi.yaml"
    path.write_text(yaml.safe_dump(settings_data(tmp_path, hosts)))
    return path


def check_live_host(report: dict, two_hosts: TwoHosts) -> None:
    assert report["reachable"] is True and report["reason"] is None
    assert report["queue"] == "pueue 4.0.4" and report["queue_problem"] is None
    assert [
        (g["name"], g["slots"], g["on_host"], g["running"], g["queued"]) for g in report["groups"]
    ] == [("gpu0", 1, "ok", 1, 1), ("gpu1", 2, "paused", 0, 0), ("gpu9", 1, "missing", 0, 0)]
    gpu0, gpu1 = report["gpus"]
    assert (
        gpu0["index"],
        gpu0["utilization_percent"],
        gpu0["memory_used_mib"],
        gpu0["memory_total_mib"],
    ) == (0, 35, 1000, 40960)
    assert gpu0["foreign_processes"] == []  # the process of our case is not foreign
    assert (gpu1["name"], gpu1["utilization_percent"]) == ("NVIDIA A100 [PCIe]", None)
    assert gpu1["foreign_processes"] == [
        {"pid": two_hosts.foreign.pid, "name": "/usr/bin/python3", "used_memory_mib": 19000}
    ]
    assert report["gpu_problem"] is None
    assert report["health"]["reachable"] is True


def test_json_report_returns_promptly_although_a_host_is_down(two_hosts, tmp_path):
    config = config_file(tmp_path, two_hosts.hosts)
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "mqi.cli", "--config", str(config), "hosts", "--json", "--timeout", "3"],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )  # fmt: skip
    elapsed = time.monotonic() - started

    # the down host retries its connection for longer than 3 s; the command does not wait for it
    assert elapsed < 3 + 5, f"took {elapsed:.1f} s"
    assert result.returncode == 1, result.stderr  # a host did not answer
    live, down = json.loads(result.stdout)
    assert (live["host"], down["host"]) == two_hosts.names
    check_live_host(live, two_hosts)
    assert down["reachable"] is False and down["reason"] == "no answer within 3 s"
    assert [g["on_host"] for g in down["groups"]] == [None, None, None]
    assert down["gpus"] == []


def test_a_down_host_is_reported_with_its_reason_marked_and_skipped_until_it_recovers(
    two_hosts, tmp_path
):
    settings = settings_for(tmp_path, two_hosts.hosts)
    live_name, down_name = two_hosts.names
    site = Site(settings)
    try:
        live, down = host_reports(site, timeout=30)
        assert live.reachable and not down.reachable
        port = two_hosts.hosts[1]["port"]
        assert f"cannot connect to 127.0.0.1:{port}" in down.reason

        health = host_health(settings.state_dir, down_name)
        assert (health.reachable, health.reason) == (False, down.reason)
        assert reachable_hosts(settings.state_dir, [live_name, down_name]) == {live_name}
        assert health_text(down.health, UTC).startswith("skipped (down since")
        assert health_text(live.health, UTC) == "used"

        after_back_off = health.next_check() + timedelta(seconds=1)
        assert reachable_hosts(settings.state_dir, [down_name], now=after_back_off) == {down_name}
        two_hosts.down_server.start()
        _, recovered = host_reports(site, timeout=30)
    finally:
        site.close()
        two_hosts.down_server.stop()
    assert recovered.reachable and recovered.queue == "pueue 4.0.4"
    assert [(g.name, g.on_host) for g in recovered.groups] == [
        ("gpu0", "ok"),
        ("gpu1", "ok"),
        ("gpu9", "missing"),
    ]
    assert host_health(settings.state_dir, down_name).reachable is True
    assert reachable_hosts(settings.state_dir, [live_name, down_name]) == {live_name, down_name}


def test_tables_and_artifact_rows(two_hosts, tmp_path):
    live_only = two_hosts.hosts[:1]
    config = config_file(tmp_path, live_only)
    result = CliRunner().invoke(app, ["--config", str(config), "hosts"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    for expected in (
        "pueue 4.0.4",
        "reachable",
        "paused",
        "missing",
        "NVIDIA A100 [PCIe]",
        "35% 1000/40960 MiB",
        f"/usr/bin/python3 (pid {two_hosts.foreign.pid})",
    ):
        assert expected in result.output, expected

    site = Site(settings_for(tmp_path, live_only))
    try:
        rows = artifact_rows(host_reports(site, timeout=30))
    finally:
        site.close()
    assert [(r["group"], r["on host"], r["running"], r["queued"]) for r in rows] == [
        ("gpu0", "ok", 1, 1),
        ("gpu1", "paused", 0, 0),
        ("gpu9", "missing", 0, 0),
    ]
    assert rows[0]["gpus"] == "0: 35% 1000/40960 MiB" and rows[0]["foreign processes"] == ""
    assert rows[1]["foreign processes"] == f"/usr/bin/python3 (pid {two_hosts.foreign.pid})"
    assert rows[2]["gpus"] == ""


def local_host(tmp_path: Path, name: str, **fields) -> dict:
    missing = tmp_path / "missing" / "nvidia-smi"
    return {"name": name, "transport": "local", "workdir": str(tmp_path / "work"),
            "nvidia_smi": str(missing), **fields}  # fmt: skip


def test_a_local_host_without_nvidia_smi(tmp_path):
    host = local_host(tmp_path, "local", queue="local")
    site = Site(settings_for(tmp_path, [host]))
    [report] = host_reports(site, timeout=30)
    assert report.reachable and report.queue == "local queue"
    assert [(g.name, g.on_host, g.running) for g in report.groups] == [("default", "ok", 0)]
    assert report.gpus == () and report.gpu_problem.startswith("nvidia-smi not available")


def test_a_reachable_host_whose_pueue_daemon_is_down(tmp_path):
    pueue = install_fake_pueue(tmp_path / "pueue")  # daemon never started
    host = local_host(tmp_path, "no-daemon", queue="pueue", pueue=str(pueue.bin))
    [report] = host_reports(Site(settings_for(tmp_path, [host])), timeout=30)
    assert report.reachable and report.queue == "pueue 4.0.4"
    assert "Couldn't connect to the daemon" in report.queue_problem
    assert [(g.name, g.on_host) for g in report.groups] == [("default", None)]


def test_a_paused_group_is_shown_with_the_cause_reconcile_found(tmp_path, fake_pueue):
    """`mqi hosts` shows why a group holding our cases is paused, as reconcile decided it."""
    fake_pueue.pause_group("default")
    host = local_host(tmp_path, "paused-host", queue="pueue", pueue=str(fake_pueue.bin))
    config = config_file(tmp_path, [host])
    state_dir = settings_for(tmp_path, [host]).state_dir
    note_pause_cause(state_dir, "paused-host", "default", "paused on the host, by someone", utc_now())

    shown = CliRunner().invoke(app, ["--config", str(config), "hosts"], env={"COLUMNS": "200"})
    as_json = CliRunner().invoke(app, ["--config", str(config), "hosts", "--json"])

    assert "why paused" in shown.output and "paused on the host, by someone" in shown.output, shown.output
    [report] = json.loads(as_json.output)
    assert [(g["on_host"], g["pause_cause"]) for g in report["groups"]] == [
        ("paused", "paused on the host, by someone")
    ]
    fake_pueue.start_group("default")  # running again: the pause and its cause are over
    [report] = json.loads(CliRunner().invoke(app, ["--config", str(config), "hosts", "--json"]).output)
    assert [(g["on_host"], g["pause_cause"]) for g in report["groups"]] == [("ok", None)]


def test_a_host_whose_key_changed_is_shown_refused_with_the_fix(sshd, tmp_path):
    impostor = generate_key(tmp_path / "impostor")
    key_type, key_data = impostor.with_suffix(".pub").read_text().split()[:2]
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(f"[{sshd.hostname}]:{sshd.port} {key_type} {key_data}\n")
    host = {"name": "reinstalled", "transport": "ssh", "queue": "pueue", "hostname": sshd.hostname,
            "port": sshd.port, "username": sshd.username, "key_file": str(sshd.key_file),
            "known_hosts": str(known_hosts), "workdir": str(tmp_path / "work")}  # fmt: skip
    config = config_file(tmp_path, [host])

    result = subprocess.run(
        [sys.executable, "-m", "mqi.cli", "--config", str(config), "hosts", "--json"],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )  # fmt: skip

    assert result.returncode == 1, result.stderr
    [report] = json.loads(result.stdout)
    assert (report["reachable"], report["needs_operator"]) == (False, True)
    assert "has CHANGED" in report["reason"] and sshd.host_key_fingerprint in report["reason"]
    assert f"line 1 of {known_hosts}" in report["reason"]
    assert f"ssh-keygen -R '[{sshd.hostname}]:{sshd.port}' -f {known_hosts}" in report["reason"]
    assert report["health"]["reachable"] is False  # placement leaves it alone until its next check

    table = CliRunner().invoke(app, ["--config", str(config), "hosts"], env={"COLUMNS": "400"})
    assert table.exit_code == 1
    assert "REFUSED, needs an operator: host 'reinstalled': the host key" in table.output
    assert "skipped (refused since" in table.output
