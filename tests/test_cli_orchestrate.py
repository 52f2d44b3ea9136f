"""The commands that run cases, as a user types them: demo, submit, cancel, retry, reconcile."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from mqi.ledger.states import CaseState
from mqi.ledger.store import Ledger
from tests.support.cases import make_case, pid_alive, ssh_host, wait_for
from tests.support.sshd import generate_key

MQI = [sys.executable, "-m", "mqi.cli"]
# The user's shell, not the test harness: no Prefect or mqi settings leak into the commands.
CLEAN_ENV = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MQI_"))}


def mqi(*args: str, cwd: Path, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([*MQI, *args], cwd=cwd, env=CLEAN_ENV, capture_output=True, text=True,
                          timeout=300, **kwargs)


def test_demo_runs_sample_cases_on_a_fresh_folder(tmp_path):
    result = mqi("demo", "--folder", str(tmp_path / "demo"), cwd=tmp_path)

    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "Traceback" not in result.stdout + result.stderr
    config = tmp_path / "demo" / "mqi.yaml"
    cases = json.loads(mqi("--config", str(config), "status", "--json", cwd=tmp_path).stdout)
    assert sorted(c["state"] for c in cases) == ["completed", "completed", "failed"]
    assert {c["group"] for c in cases} <= {"gpu0", "gpu1"}
    completed = [c["name"] for c in cases if c["state"] == "completed"]
    assert all((tmp_path / "demo" / "results" / name / "dose.raw").exists() for name in completed)


def write_config(root: Path, prefect_server: str) -> Path:
    config = root / "mqi.yaml"
    config.write_text(yaml.safe_dump({
        "state_dir": str(root / ".mqi"),
        "results_dir": str(root / "results"),
        "ledger": {"url": f"sqlite:///{root / 'mqi.db'}"},
        "prefect": {"api_url": prefect_server},
        "case": {"command": "echo $$ > engine.pid; if [ -e SLOW ]; then exec sleep 300; fi; "
                            "mkdir -p output; cp RTPLAN.dcm output/", "poll_seconds": 0.3},
        "hosts": [{"name": f"cli-{root.name[-20:]}", "workdir": str(root / "work"),
                   "groups": [{"name": "gpu0", "slots": 1}]}],
    }))
    return config


def test_submit_takes_a_folder_whose_name_is_not_utf8(tmp_path, prefect_server):
    config = write_config(tmp_path, prefect_server)
    folder = make_case(tmp_path, "plan").rename(tmp_path / "inbox" / os.fsdecode(b"plan-\xff-x"))

    result = mqi("--config", str(config), "submit", str(folder), cwd=tmp_path)

    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    # The case's name is shown and used for its results with the odd byte as U+FFFD.
    assert (tmp_path / "results" / "plan-\ufffd-x" / "RTPLAN.dcm").exists()


def test_submit_cancel_retry_and_reconcile_commands(tmp_path, prefect_server):
    config = write_config(tmp_path, prefect_server)
    folder = make_case(tmp_path, "cli-case")
    (folder / "SLOW").write_text("")
    submit = subprocess.Popen([*MQI, "--config", str(config), "submit", str(folder)], cwd=tmp_path, env=CLEAN_ENV,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def show() -> dict:
        result = mqi("--config", str(config), "show", str(folder), "--json", cwd=tmp_path)
        return json.loads(result.stdout) if result.returncode == 0 else {}

    case = wait_for(lambda: (lambda c: c if c.get("state") == "running" else None)(show()), timeout=120,
                    what="the case to run")
    pid = int(wait_for(lambda: _read(tmp_path / "work" / case["uid"] / "engine.pid"), what="the engine pid"))

    assert "only a finished case" in mqi("--config", str(config), "retry", str(case["id"]), cwd=tmp_path).stderr
    cancel = mqi("--config", str(config), "cancel", case["uid"], cwd=tmp_path)
    assert cancel.returncode == 0 and "cancelled" in cancel.stdout, cancel.stderr
    assert submit.wait(120) == 1  # `mqi submit` reports the case did not complete
    assert not pid_alive(pid)
    assert show()["state"] == "cancelled" and show()["attempts"][0]["result"] == "cancelled"
    again = mqi("--config", str(config), "cancel", case["uid"], cwd=tmp_path)
    assert again.returncode == 1 and "already cancelled" in again.stderr

    (folder / "SLOW").unlink()
    retry = mqi("--config", str(config), "retry", str(case["id"]), "--now", cwd=tmp_path)
    assert retry.returncode == 0, retry.stdout[-2000:] + retry.stderr[-2000:]
    attempts = show()["attempts"]
    assert [a["result"] for a in attempts] == ["cancelled", "success"] and show()["state"] == "completed"

    reconcile = mqi("--config", str(config), "reconcile", cwd=tmp_path)
    assert reconcile.returncode == 0, reconcile.stderr
    host_rows = _artifact_rows("mqi-hosts")  # the UI's view of hosts, groups and GPUs
    assert any(row.get("host") == f"cli-{tmp_path.name[-20:]}" for row in host_rows), host_rows
    unknown = mqi("--config", str(config), "cancel", "no-such-case", cwd=tmp_path)
    assert unknown.returncode == 1 and "no case has" in unknown.stderr and "Traceback" not in unknown.stderr


def _artifact_rows(key: str) -> list[dict]:
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    with get_client(sync_client=True) as client:
        [artifact] = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])),
                                           limit=1, sort=ArtifactSort.CREATED_DESC)
    data = artifact.data
    return json.loads(data) if isinstance(data, str) else data


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip() or None
    except FileNotFoundError:
        return None


def test_submit_to_a_host_whose_key_changed_ends_with_the_fix_and_the_case_waits(tmp_path, prefect_server, sshd,
                                                                                  fake_pueue):
    impostor = generate_key(tmp_path / "impostor")
    key_type, key_data = impostor.with_suffix(".pub").read_text().split()[:2]
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(f"[{sshd.hostname}]:{sshd.port} {key_type} {key_data}\n")
    host = ssh_host(tmp_path, sshd, fake_pueue) | {"known_hosts": str(known_hosts)}
    config = tmp_path / "mqi.yaml"
    config.write_text(yaml.safe_dump({
        "state_dir": str(tmp_path / ".mqi"), "results_dir": str(tmp_path / "results"),
        "ledger": {"url": f"sqlite:///{tmp_path / 'mqi.db'}"}, "prefect": {"api_url": prefect_server},
        "case": {"command": "mkdir -p output; cp RTPLAN.dcm output/", "poll_seconds": 0.3}, "hosts": [host],
    }))
    folder = make_case(tmp_path, "plan")

    for _ in ("first try", "again, with the host already marked refused"):
        result = subprocess.run([*MQI, "--config", str(config), "submit", str(folder)], cwd=tmp_path, env=CLEAN_ENV,
                                capture_output=True, text=True, timeout=150)  # it used to wait for ever here

        assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-2000:]
        assert "Traceback" not in result.stdout + result.stderr
        [error] = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
        assert error.startswith(f"error: host {host['name']!r}: the host key of") and "has CHANGED" in error
        assert f"ssh-keygen -R '[{sshd.hostname}]:{sshd.port}' -f {known_hosts}" in error

    ledger = Ledger.open(f"sqlite:///{tmp_path / 'mqi.db'}")
    case = ledger.find_case(str(folder))
    assert case.state is CaseState.PENDING and case.failure_category is None  # resumable, never failed
    assert CaseState.FAILED not in {event.to_state for event in ledger.events(case.id)}
    assert ledger.attempts(case.id) == [] and fake_pueue.status()["tasks"] == {}
    assert not (tmp_path / "remote").exists(), "something was sent to a host that was not verified"
