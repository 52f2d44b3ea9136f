"""Settings: YAML file, environment overrides, validation, and `mqi config check`."""

from pathlib import Path

import pytest
from typer.testing import CliRunner

from mqi.cli import app
from mqi.errors import ConfigError
from mqi.settings import load_settings

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "mqi.yaml"
    path.write_text(text)
    return path


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in list(__import__("os").environ):
        if name.startswith("MQI_"):
            monkeypatch.delenv(name)


def test_no_file_gives_the_embedded_local_default():
    settings = load_settings()
    assert settings.ledger.url.get_secret_value() == "sqlite:///./mqi.db"
    assert [(h.name, h.transport, h.queue) for h in settings.hosts] == [("local", "local", "local")]
    assert settings.case.timeout_hours == 24 and settings.timezone == "Asia/Seoul"


def test_yaml_values_and_nested_environment_overrides(tmp_path, monkeypatch):
    path = write(tmp_path, "case: {poll_seconds: 2.5, timeout_hours: 1.5}\ntimezone: UTC\n")
    monkeypatch.setenv("MQI_CASE__POLL_SECONDS", "0.25")
    settings = load_settings(path)
    assert settings.case.poll_seconds == 0.25  # the environment wins
    assert settings.case.timeout_hours == 1.5  # untouched keys stay from the file
    assert settings.timezone == "UTC"


def test_config_env_variable_names_the_file(tmp_path, monkeypatch):
    path = write(tmp_path, "results_dir: /srv/results\n")
    monkeypatch.setenv("MQI_CONFIG", str(path))
    assert load_settings().results_dir == Path("/srv/results")


def test_every_problem_is_named_with_its_dotted_path(tmp_path):
    path = write(
        tmp_path,
        """
case: {poll_seconds: fast, colour: red}
timezone: Mars/Olympus
hosts:
  - {name: a, groups: [{name: g}, {name: g}]}
  - {name: a, transport: ssh}
""",
    )
    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    problems = "\n".join(caught.value.problems)
    assert "case.poll_seconds: Input should be a valid number" in problems
    assert "case.colour: unknown key" in problems
    assert "timezone: unknown time zone 'Mars/Olympus'" in problems
    assert "hosts: duplicate host names: a" in problems
    assert "duplicate group names: g" in problems
    assert "hostname is required for transport ssh" in problems


def test_missing_key_file_is_named(tmp_path):
    path = write(tmp_path, "hosts: [{name: h, transport: ssh, hostname: 127.0.0.1, username: u, key_file: /nope/id}]\n")
    with pytest.raises(ConfigError, match="key_file '/nope/id' does not exist"):
        load_settings(path)


def test_yaml_syntax_error_names_the_line(tmp_path):
    path = write(tmp_path, "timezone: UTC\ncase: [1\nresults_dir: x\n")
    with pytest.raises(ConfigError, match=r"YAML syntax error at line 3"):
        load_settings(path)


def test_named_file_must_exist(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_settings(tmp_path / "absent.yaml")


def test_the_shipped_example_is_valid():
    settings = load_settings(REPO / "mqi.example.yaml")
    assert settings.hosts[0].name == "local"


def test_config_check_masks_secrets(tmp_path, monkeypatch):
    key = tmp_path / "id"
    key.write_text("not really a key")
    path = write(
        tmp_path,
        f"""
ledger: {{url: "postgresql://mqi:CANARY-DB-PW@db.example/mqi"}}
hosts:
  - {{name: g1, transport: ssh, queue: pueue, hostname: 127.0.0.1, username: mqi,
      key_file: {key}, key_passphrase: CANARY-PASSPHRASE, workdir: /data/mqi,
      groups: [{{name: gpu0, devices: 0}}]}}
""",
    )
    result = CliRunner().invoke(app, ["--config", str(path), "config", "check"])
    assert result.exit_code == 0, result.output
    assert "CANARY" not in result.output
    assert "postgresql://mqi:***@db.example/mqi" in result.output
    assert "devices: '0'" in result.output


def test_config_check_exits_2_without_traceback(tmp_path):
    path = write(tmp_path, "hosts: [{name: a}, {name: a}]\nbogus: 1\n")
    result = CliRunner().invoke(app, ["--config", str(path), "config", "check"])
    assert result.exit_code == 2
    assert "bogus: unknown key" in result.output
    assert "duplicate host names: a" in result.output
    assert "Traceback" not in result.output
