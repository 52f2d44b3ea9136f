"""`mqi run`, the main job, as a user starts it: an embedded Prefect server, the inbox, Ctrl-C."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import yaml

from tests.test_process_case import wait_for

MQI = [sys.executable, "-m", "mqi.cli"]


def write_config(root: Path) -> Path:
    engine = f"{shlex.quote(sys.executable)} -m mqi.demo_engine --batches 2 --seconds-per-batch 0.1"
    config = root / "mqi.yaml"
    config.write_text(yaml.safe_dump({
        "state_dir": str(root / ".mqi"),
        "inbox": {"path": str(root / "inbox"), "quiet_seconds": 1, "scan_seconds": 2},
        "results_dir": str(root / "results"),
        "ledger": {"url": f"sqlite:///{root / 'mqi.db'}"},
        "case": {"command": engine, "poll_seconds": 0.5},
        "hosts": [{"name": "local", "workdir": str(root / "work"), "groups": [{"name": "gpu0", "slots": 1}]}],
    }))
    (root / "inbox").mkdir()
    return config


def status(config: Path) -> list[dict]:
    result = subprocess.run([*MQI, "--config", str(config), "status", "--json"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_main_job_processes_the_inbox_shows_its_ui_refuses_a_twin_and_stops_on_ctrl_c(tmp_path):
    config = write_config(tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    log = tmp_path / "run.log"
    job = subprocess.Popen([*MQI, "--config", str(config), "run"], cwd=tmp_path, env=env,
                           stdout=open(log, "wb"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        ui_line = wait_for(lambda: next((l for l in log.read_text().splitlines() if l.startswith("Prefect UI:")), None),
                           timeout=180, what="the UI address")
        api = ui_line.split("API ")[1].rstrip(")")
        assert urllib.request.urlopen(f"{api}/health", timeout=5).status == 200

        staging = tmp_path / "staging" / "case-1"
        staging.mkdir(parents=True)
        (staging / "RTPLAN.dcm").write_bytes(b"plan")
        staging.rename(tmp_path / "inbox" / "case-1")  # appears complete, as a copy tool would
        wait_for(lambda: [c["state"] for c in status(config)] == ["completed"], timeout=180,
                 what="the case to complete")
        assert (tmp_path / "results" / "case-1" / "dose.raw").exists()

        twin = subprocess.run([*MQI, "--config", str(config), "run"], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=120)
        assert twin.returncode != 0
        assert f"pid {job.pid}" in twin.stderr and "stop it first" in twin.stderr
    finally:
        os.killpg(job.pid, signal.SIGINT)  # Ctrl-C reaches the whole foreground group
        try:
            job.wait(90)
        except subprocess.TimeoutExpired:
            os.killpg(job.pid, signal.SIGKILL)
            raise
    # A scan or reconcile run caught mid-way by Ctrl-C is reported crashed by Prefect itself
    # (its own traceback); no error may come from our code.
    output = log.read_text()
    ours = [line for line in output.splitlines()
            if 'File "' in line and any(f"/{part}/" in line for part in ("mqi", "flows", "tasks", "blocks"))]
    assert not ours, output[-3000:]
    assert "error:" not in output, output[-3000:]
    time.sleep(1)
    try:
        urllib.request.urlopen(f"{api}/health", timeout=2)
        raise AssertionError("the embedded Prefect server outlived mqi run")
    except OSError:
        pass
