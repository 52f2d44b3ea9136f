"""Security end to end: host keys, secrets that must never show, no shell for our text, private files."""

from __future__ import annotations

import logging
import secrets
import stat
from pathlib import Path

import pytest
from sqlalchemy import MetaData, create_engine, make_url, select

from mqi.ledger.states import CaseState
from mqi.logfile import setup_main_job_logging
from mqi.settings import Settings
from tests.support.cases import make_case, run_case, settings_for, ssh_host, start
from tests.support.databases import _fresh_postgres_schema
from tests.support.sshd import generate_key
from tests.test_bad_input import SHELL_BAIT, canaries

pytestmark = pytest.mark.usefixtures("prefect_server")

OUTPUT = "mkdir -p output && cp RTPLAN.dcm output/dose.dcm"


# -- host keys -----------------------------------------------------------------------------


@pytest.mark.parametrize("known", ["unknown", "changed"])
def test_unknown_or_changed_host_key_stops_the_case_before_any_upload(tmp_path, sshd, fake_pueue, known):
    known_hosts = tmp_path / "known_hosts"
    if known == "unknown":
        known_hosts.write_text("")
    else:  # the same address with another machine's key: a man in the middle, or a reinstall
        impostor = generate_key(tmp_path / "impostor")
        key_type, key_data = impostor.with_suffix(".pub").read_text().split()[:2]
        known_hosts.write_text(f"[{sshd.hostname}]:{sshd.port} {key_type} {key_data}\n")
    trusted = known_hosts.read_text()
    host = ssh_host(tmp_path, sshd, fake_pueue) | {"known_hosts": str(known_hosts)}
    site = start(settings_for(tmp_path, [host], command=OUTPUT))
    folder = make_case(tmp_path, f"{known}-key")

    with pytest.raises(Exception) as raised:
        run_case(folder)

    assert sshd.host_key_fingerprint in str(raised.value)
    case = site.ledger.find_case(str(folder))
    assert case.state is not CaseState.COMPLETED and site.ledger.attempts(case.id) == []
    assert not (tmp_path / "remote").exists(), "something was uploaded to an unverified host"
    assert fake_pueue.status()["tasks"] == {}
    assert known_hosts.read_text() == trusted, "an unverified key was recorded"


# -- secrets -------------------------------------------------------------------------------


@pytest.fixture
def canary_ledger_url(postgres_admin):
    """A fresh PostgreSQL ledger whose URL carries a canary password (trust auth ignores it)."""
    password = f"CANARY-{secrets.token_hex(8)}"
    for url in _fresh_postgres_schema(postgres_admin):
        yield make_url(url).set(password=password).render_as_string(hide_password=False), password


def test_canary_secrets_appear_nowhere(tmp_path, sshd, fake_pueue, canary_ledger_url, caplog):
    ledger_url, db_password = canary_ledger_url
    host = ssh_host(tmp_path, sshd, fake_pueue) | {"key_file": str(sshd.encrypted_key_file),
                                                   "key_passphrase": sshd.key_passphrase}
    settings = settings_for(tmp_path, [host], command="echo engine says hello; " + OUTPUT)
    settings = changed(settings, "ledger", url=ledger_url)
    canaries_ = [db_password, sshd.key_passphrase]
    site = start(settings)
    log_file = setup_main_job_logging(settings)
    caplog.set_level(logging.DEBUG)

    assert run_case(make_case(tmp_path, "good")) == "completed"
    site = start(changed(settings, "case", command="echo engine failed; exit 3"))
    assert run_case(make_case(tmp_path, "bad")) == "failed"
    for handler in logging.getLogger("mqi").handlers:
        handler.flush()

    places = {
        "log records": "\n".join(f"{r.getMessage()} {r.exc_text or ''}" for r in caplog.records) + caplog.text,
        "log file": log_file.read_text(errors="replace"),
        "ledger": _all_rows(ledger_url),
        "prefect": _prefect_records(),
        "pueue task environments": repr([t.get("envs") for t in fake_pueue.status()["tasks"].values()]),
        "reprs": repr(site.ledger) + repr(settings) + str(settings.masked()),
    }
    assert "mqi.case.completed" in places["prefect"], "the Prefect records searched are not the runs' records"
    for canary in canaries_:
        found = [where for where, text in places.items() if canary in text]
        assert found == [], f"a secret leaked into: {found}"


def changed(settings: Settings, section: str, **values) -> Settings:
    data = settings.model_dump()
    data[section] = data[section] | values
    return Settings(**data)


def _all_rows(url: str) -> str:
    engine = create_engine(url)
    try:
        metadata = MetaData()
        metadata.reflect(engine)
        with engine.connect() as connection:
            return repr([connection.execute(select(table)).all() for table in metadata.sorted_tables])
    finally:
        engine.dispose()


def _prefect_records() -> str:
    """The Prefect side of the runs: flow runs, logs, artifacts and events, as text."""
    from prefect import get_client
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    EventsWorker.drain_all(timeout=10, at_exit=False)
    APILogWorker.drain_all(timeout=10, at_exit=False)
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(limit=200)
        logs = client.read_logs(limit=200)
        artifacts = client.read_artifacts(limit=200)
        page = client.read_events(limit=50)
        events = page.events
        while page.next_page:
            page = client.read_events_page(page.next_page)
            events += page.events
    return "\n".join(repr(item) for item in [*runs, *logs, *artifacts, *events])


# -- no shell for our text -----------------------------------------------------------------


def test_names_and_config_values_are_never_run_by_a_shell(tmp_path, sshd, fake_pueue):
    bait = f"$({SHELL_BAIT}); `{SHELL_BAIT}`; {SHELL_BAIT}"
    groups = ({"name": "default", "slots": 1, "devices": f"0 {bait}"},)
    host = ssh_host(tmp_path, sshd, fake_pueue, groups=groups) | {"workdir": str(tmp_path / f"remote {bait}")}
    site = start(settings_for(tmp_path, [host], command=OUTPUT))
    folder = make_case(tmp_path, f"case {bait}")
    (folder / f"file {bait}").write_text("bait")

    assert run_case(folder) == "completed"

    case = site.ledger.find_case(str(folder))
    assert (Path(case.results_path) / "dose.dcm").exists()
    [task] = fake_pueue.status()["tasks"].values()
    assert task["envs"]["CUDA_VISIBLE_DEVICES"] == f"0 {bait}"  # passed as a value, never parsed
    assert canaries(tmp_path) == [], "text from a name or a setting was executed by a shell"


# -- private files -------------------------------------------------------------------------


def test_ledger_and_results_keep_other_local_users_out(tmp_path, sshd, fake_pueue):
    site = start(settings_for(tmp_path, [ssh_host(tmp_path, sshd, fake_pueue)], command=OUTPUT))
    assert run_case(make_case(tmp_path, "private")) == "completed"

    ledger_files = [p for p in tmp_path.glob("mqi.db*") if p.is_file()]
    assert ledger_files and all(_mode(p) & 0o077 == 0 for p in ledger_files), {p.name: oct(_mode(p)) for p in ledger_files}
    assert _mode(site.settings.results_dir) & 0o077 == 0, oct(_mode(site.settings.results_dir))


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)
