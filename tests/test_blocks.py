"""Prefect blocks: registration, secrets, and hosts taken from saved blocks.

Tests that talk to Prefect use the session's temporary Prefect server (`prefect_server`).
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from blocks import GpuHost, LedgerDatabase, resolve_host_blocks
from mqi.errors import ConfigError
from mqi.settings import HostSettings, LedgerSettings, load_settings

REPO = Path(__file__).resolve().parents[1]
PASSWORD = "pw-Secret-9431"
PASSPHRASE = "phrase-Secret-2207"
PRIVATE_KEY = "-----BEGIN OPENSSH PRIVATE KEY-----\nkey-Secret-5150\n-----END OPENSSH PRIVATE KEY-----"
LEDGER_URL = "postgresql+psycopg://mqi:db-Secret-7781@db.example/ledger"
SECRETS = [PASSWORD, PASSPHRASE, "key-Secret-5150", "db-Secret-7781"]

GPU1_YAML = """\
hosts:
  - name: gpu1
    transport: ssh
    queue: pueue
    hostname: 127.0.0.1
    port: 2222
    username: mqi
    key_file: {key_file}
    key_passphrase: {passphrase}
    known_hosts: /etc/mqi/known_hosts
    accept_unknown_host_keys: true
    pueue: /opt/pueue/bin/pueue
    workdir: /scratch/mqi
    groups:
      - {{name: gpu0, slots: 2, devices: 0}}
      - {{name: gpu1, slots: 1, devices: "1"}}
"""


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in list(os.environ):
        if name.startswith("MQI_"):
            monkeypatch.delenv(name)


@pytest.fixture
def key_file(tmp_path) -> Path:
    path = tmp_path / "id_ed25519"
    path.write_text(PRIVATE_KEY + "\n")
    return path


def gpu1_block(key_file: Path) -> GpuHost:
    """The block equivalent of GPU1_YAML."""
    return GpuHost(
        transport="ssh",
        queue="pueue",
        hostname="127.0.0.1",
        port=2222,
        username="mqi",
        key_file=key_file,
        key_passphrase=PASSPHRASE,
        known_hosts="/etc/mqi/known_hosts",
        accept_unknown_host_keys=True,
        pueue="/opt/pueue/bin/pueue",
        workdir="/scratch/mqi",
        groups=[{"name": "gpu0", "slots": 2, "devices": "0"}, {"name": "gpu1", "slots": 1, "devices": "1"}],
    )


def password_block(**changes) -> GpuHost:
    fields = dict(transport="ssh", queue="pueue", hostname="127.0.0.1", username="mqi", password=PASSWORD)
    return GpuHost(**(fields | changes))


def unique(prefix: str) -> str:
    # Block names are shared by the whole session's Prefect server.
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def write_settings(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "mqi.yaml"
    path.write_text(text)
    return path


def test_the_block_carries_every_host_setting():
    # A field added to HostSettings must be added to GpuHost too, with the same definition.
    host_fields = set(HostSettings.model_fields) - {"name", "block"}
    assert host_fields <= set(GpuHost.model_fields)
    for field in host_fields:
        assert repr(GpuHost.model_fields[field]) == repr(HostSettings.model_fields[field]), field


def test_to_host_settings_equals_the_host_from_yaml(tmp_path, key_file):
    from_yaml = load_settings(
        write_settings(tmp_path, GPU1_YAML.format(key_file=key_file, passphrase=PASSPHRASE))
    ).host("gpu1")

    from_block = gpu1_block(key_file).to_host_settings("gpu1")

    assert from_block == from_yaml
    assert from_block.key_passphrase.get_secret_value() == PASSPHRASE


def test_private_key_in_the_block_becomes_a_file_only_the_user_can_read():
    host = password_block(password=None, private_key=PRIVATE_KEY).to_host_settings("gpu1")

    assert host.key_file.read_text() == PRIVATE_KEY + "\n"  # the final newline key parsers need
    assert host.key_file.stat().st_mode & 0o777 == 0o600
    assert host.key_file.parent.stat().st_mode & 0o777 == 0o700


def test_private_key_and_key_file_together_are_refused(key_file):
    with pytest.raises(ValueError, match="either private_key or key_file"):
        password_block(private_key=PRIVATE_KEY, key_file=key_file)


def test_invalid_block_content_is_a_config_error_naming_host_and_problem():
    with pytest.raises(ConfigError) as caught:
        password_block(hostname=None, password=None).to_host_settings("gpu1")

    (problem,) = caught.value.problems
    assert "host 'gpu1'" in problem
    assert "hostname is required for transport ssh" in problem
    assert "key_file or password is required" in problem


def test_secrets_are_masked_in_repr_str_and_dumps(key_file):
    gpu_host = password_block(key_passphrase=PASSPHRASE, private_key=PRIVATE_KEY)
    ledger = LedgerDatabase(url=LEDGER_URL)
    host_settings = gpu_host.to_host_settings("gpu1")

    for shown in (gpu_host, ledger, host_settings):
        texts = [repr(shown), str(shown), str(shown.model_dump()), shown.model_dump_json()]
        for text in texts:
            assert not any(secret in text for secret in SECRETS), text
    assert ledger.to_ledger_settings().display_url() == "postgresql+psycopg://mqi:***@db.example/ledger"


def test_ledger_block_gives_ledger_settings_and_refuses_a_bad_url():
    assert LedgerDatabase(url=LEDGER_URL).to_ledger_settings() == LedgerSettings(url=LEDGER_URL)

    with pytest.raises(ConfigError, match="ledger block .*url: the ledger URL is not a database URL"):
        LedgerDatabase(url="not a url").to_ledger_settings()


def test_a_host_naming_a_block_may_not_also_define_inline_fields(tmp_path):
    path = write_settings(tmp_path, "hosts: [{name: gpu1, block: gpu1, hostname: 10.0.0.5}]\n")

    with pytest.raises(ConfigError, match="either block or inline fields.*remove hostname"):
        load_settings(path)


def test_cli_registers_both_block_types(prefect_server):
    from prefect.client.orchestration import get_client

    result = subprocess.run(
        [sys.executable, "-m", "prefect", "block", "register", "-m", "blocks"],
        env={**os.environ, "PREFECT_API_URL": prefect_server},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert result.returncode == 0, result.stdout + result.stderr
    with get_client(sync_client=True) as client:
        assert client.read_block_type_by_slug("mqi-gpu-host").name == "MQI GPU Host"
        assert client.read_block_type_by_slug("mqi-ledger").name == "MQI Ledger"


def test_saved_gpu_host_loads_back_with_its_secrets_kept_secret_by_prefect(prefect_server):
    from prefect.client.orchestration import get_client

    name = unique("gpu1")
    password_block(key_passphrase=PASSPHRASE).save(name)

    loaded = GpuHost.load(name)
    assert loaded.password.get_secret_value() == PASSWORD
    expected = password_block(key_passphrase=PASSPHRASE).to_host_settings("gpu1")
    assert loaded.to_host_settings("gpu1") == expected
    with get_client(sync_client=True) as client:
        stored = client.read_block_document_by_name(name, "mqi-gpu-host", include_secrets=False)
    assert PASSWORD not in str(stored.data) and PASSPHRASE not in str(stored.data)


def test_saved_ledger_database_loads_back(prefect_server):
    name = unique("ledger")
    LedgerDatabase(url=LEDGER_URL).save(name)

    assert LedgerDatabase.load(name).to_ledger_settings().url.get_secret_value() == LEDGER_URL


def test_settings_naming_a_block_resolve_to_the_blocks_host(prefect_server, tmp_path, key_file):
    block_name = unique("gpu1")
    gpu1_block(key_file).save(block_name)
    path = write_settings(tmp_path, f"hosts:\n  - {{name: gpu1, block: {block_name}}}\n  - {{name: local}}\n")
    settings = load_settings(path)  # needs no Prefect server: the block is only named

    resolved = resolve_host_blocks(settings)

    assert resolved.host("gpu1") == gpu1_block(key_file).to_host_settings("gpu1")
    assert resolved.host("local") == settings.host("local")
    assert settings.host("gpu1").block == block_name  # the loaded settings are left as they were


def test_settings_without_block_hosts_are_returned_untouched():
    settings = load_settings()

    assert resolve_host_blocks(settings) is settings


def test_every_missing_block_is_named_in_one_error(prefect_server, tmp_path):
    hosts = "hosts: [{name: gpu1, block: no-such-a}, {name: gpu2, block: no-such-b}]\n"
    path = write_settings(tmp_path, hosts)

    with pytest.raises(ConfigError) as caught:
        resolve_host_blocks(load_settings(path))

    problems = caught.value.problems
    assert len(problems) == 2
    assert "host 'gpu1'" in problems[0] and "'no-such-a'" in problems[0]
    assert "host 'gpu2'" in problems[1] and "'no-such-b'" in problems[1]


def test_a_host_naming_an_unloaded_block_is_never_used_with_defaults(tmp_path):
    from mqi.errors import ConfigError
    from mqi.settings import Settings
    from mqi.site import Site

    site = Site(Settings(state_dir=tmp_path, hosts=[{"name": "gpu1", "block": "gpu1"}]))
    with pytest.raises(ConfigError, match="names the Prefect block 'gpu1', which was not loaded"):
        site.queue("gpu1")
    with pytest.raises(ConfigError, match="which was not loaded"):
        site.transport("gpu1")
