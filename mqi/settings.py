"""Settings: one YAML file, every value overridable from the environment.

Order of precedence (highest first): `MQI_*` environment variables (nested keys joined with
`__`, e.g. `MQI_CASE__POLL_SECONDS=2`), the YAML file, the embedded defaults. With no file at
all the embedded defaults describe a complete local setup: the local transport and queue,
SQLite in the working folder, an inbox and a results folder beside it.

Relative paths are taken relative to the working folder of the process that reads the
settings, and made absolute at once.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal, get_origin
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict, SettingsError
from sqlalchemy.engine import make_url

from mqi.errors import ConfigError
from mqi.settings_inputs import ENV_PREFIX, config_path

MOQUI_PROGRESS_PATTERN = r"Generating particles for \((\d+) of (\d+) batches\)"

# Names end up in remote paths, pueue group names and Prefect limit names.
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


class InboxSettings(StrictModel):
    path: Path = Path("inbox")
    quiet_seconds: float = Field(5.0, ge=0, description="a folder is complete when unchanged this long")
    ready_marker: str | None = Field(
        None, description="if set, a folder is complete when this file exists in it"
    )
    scan_seconds: float = Field(10.0, gt=0, description="interval of the scan-inbox schedule")

    @field_validator("path")
    @classmethod
    def _a_folder_or_none_yet(cls, path: Path) -> Path:
        # A missing inbox is fine: `mqi run` creates it. A file in its place would stop the run.
        problem = _folder_problem(path.expanduser().absolute())
        if problem:
            raise ValueError(problem)
        return path


def _folder_problem(path: Path) -> str | None:
    """Why `path` cannot be used (or created) as a folder, or None."""
    for existing in (path, *path.parents):
        try:
            found, folder = existing.exists(), existing.is_dir()
        except OSError as error:  # e.g. a parent folder this user may not enter
            return f"{str(path)!r} cannot be checked: {error.strerror or error}"
        if found:
            if folder:
                return None
            if existing == path:
                return f"{str(path)!r} exists but is not a folder"
            return f"{str(path)!r} cannot be created: {str(existing)!r} is not a folder"
    return None


class LedgerSettings(StrictModel):
    url: SecretStr = SecretStr("sqlite:///./mqi.db")

    @field_validator("url")
    @classmethod
    def _usable(cls, value: SecretStr) -> SecretStr:
        # Here, not when the ledger is opened: `mqi config check` names a wrong URL or driver.
        # Imported when used: the ledger package stays free to import the settings.
        from mqi.ledger.engine import LedgerError, parse_url

        try:
            url = parse_url(value.get_secret_value())
        except LedgerError as error:
            raise ValueError(str(error)) from None
        if url.get_backend_name() == "sqlite" and url.database and not url.database.startswith("file:"):
            problem = _folder_problem(Path(url.database).absolute().parent)
            if problem:
                raise ValueError(f"the SQLite ledger cannot be created: {problem}")
        return value

    def display_url(self) -> str:
        """The URL with any password masked."""
        return make_url(self.url.get_secret_value()).render_as_string(hide_password=True)


class CaseSettings(StrictModel):
    command: str = Field(
        "python interpreter.py && python moquisim.py",
        min_length=1,
        description="shell command run inside the uploaded case folder",
    )
    output_subdir: str = Field("output", pattern=NAME_PATTERN)
    timeout_hours: float = Field(24.0, gt=0)
    poll_seconds: float = Field(10.0, gt=0)
    progress_pattern: str = Field(
        MOQUI_PROGRESS_PATTERN, description="regex with two groups: batches done, batches total"
    )
    log_tail_lines: int = Field(30, ge=1, le=10_000)

    @field_validator("progress_pattern")
    @classmethod
    def _two_groups(cls, value: str) -> str:
        try:
            compiled = re.compile(value)
        except re.error as exc:
            raise ValueError(f"not a valid regular expression: {exc}") from None
        if compiled.groups != 2:
            raise ValueError("needs exactly two groups: batches done and batches total")
        return value


class GroupSettings(StrictModel):
    name: str = Field(pattern=NAME_PATTERN)
    slots: int = Field(1, ge=1)
    queue_ahead: int = Field(
        0, ge=0,
        description="cases per group uploaded and queued in pueue beyond its slots, so pueue starts the next "
                    "task the moment one ends; pueue's own group parallelism must then equal slots",
    )
    devices: str | None = Field(None, description="CUDA_VISIBLE_DEVICES for tasks of this group")

    @property
    def capacity(self) -> int:
        """Cases that may hold this group at once: running on its GPUs, or queued right behind."""
        return self.slots + self.queue_ahead

    @field_validator("devices", mode="before")
    @classmethod
    def _devices_as_text(cls, value: Any) -> Any:
        # YAML reads `devices: 0` as an int and `devices: 0,1` as a string; both mean the same.
        return str(value) if isinstance(value, int) else value


class HostSettings(StrictModel):
    name: str = Field(pattern=NAME_PATTERN)
    transport: Literal["ssh", "local"] = "local"
    queue: Literal["pueue", "local"] = "local"
    hostname: str | None = None
    port: int = Field(22, ge=1, le=65535)
    username: str | None = None
    key_file: Path | None = None
    key_passphrase: SecretStr | None = None
    password: SecretStr | None = None
    known_hosts: Path = Path("~/.ssh/known_hosts")
    accept_unknown_host_keys: bool = Field(
        False, description="record an unknown host key on first use instead of refusing it"
    )
    connect_timeout: float = Field(10.0, gt=0)
    command_timeout: float = Field(60.0, gt=0)
    pueue: str = "pueue"
    pueue_pid_file: str | None = Field(
        None,
        pattern=r"^/",
        description="the pid file of the host's pueue daemon (pueue.yml's pid_path), when not in pueue's default "
        "places ($XDG_RUNTIME_DIR/pueue.pid, ~/.local/share/pueue/pueue.pid); tells when the daemon restarted",
    )
    nvidia_smi: str = Field(
        "nvidia-smi", min_length=1,
        description="nvidia-smi on the host; an absolute path, since a non-login shell's PATH may lack it",
    )
    avoid_foreign_gpu_processes: bool = Field(
        False, description="placement skips a group whose GPUs run compute processes that are not our tasks"
    )
    workdir: str = "work"
    groups: list[GroupSettings] = Field(default_factory=lambda: [GroupSettings(name="default")])
    block: str | None = Field(
        None,
        min_length=1,
        description="name of a saved 'MQI GPU Host' Prefect block that holds this host's settings "
        "(resolved when the orchestrator starts, see blocks.gpu_host.resolve_host_blocks)",
    )

    @model_validator(mode="after")
    def _block_or_inline(self) -> HostSettings:
        # A block reference is a placeholder: any inline field would be silently replaced by the block.
        inline = sorted(self.model_fields_set - {"name", "block"})
        if self.block is not None and inline:
            raise ValueError(
                f"either block or inline fields: block {self.block!r} is given, so remove {', '.join(inline)}"
            )
        return self

    @model_validator(mode="after")
    def _consistent(self) -> HostSettings:
        problems = []
        if self.transport == "ssh":
            if not self.hostname:
                problems.append("hostname is required for transport ssh")
            if not self.username:
                problems.append("username is required for transport ssh")
            if self.key_file is None and self.password is None:
                problems.append("key_file or password is required for transport ssh")
        if self.key_file is not None and not self.key_file.expanduser().is_file():
            problems.append(f"key_file {str(self.key_file)!r} does not exist")
        if not self.groups:
            problems.append("at least one group is required")
        duplicates = _duplicates(g.name for g in self.groups)
        if duplicates:
            problems.append(f"duplicate group names: {', '.join(duplicates)}")
        if problems:
            raise ValueError("; ".join(problems))
        return self


class TransferSettings(StrictModel):
    remove_remote_after_download: bool = False
    timeout_seconds: float = Field(3600.0, gt=0)


class RetrySettings(StrictModel):
    max_attempts: int = Field(
        1, ge=1, description="attempts in all for an engine, lost or infrastructure failure; 1 = no retry"
    )
    infrastructure_attempts: int = Field(
        3, ge=1,
        description="attempts in all when the host ended the task itself (killed by a pueue daemon restart); "
        "never fewer than max_attempts",
    )
    retry_timeouts: bool = False

    def attempts_allowed(self, host_fault: bool) -> int:
        """Attempts in all for a failure; `host_fault`: the host ended the task (a daemon restart)."""
        return max(self.max_attempts, self.infrastructure_attempts) if host_fault else self.max_attempts


class PrefectSettings(StrictModel):
    api_url: str | None = Field(None, description="a Prefect server; none = an embedded one")


def _default_hosts() -> list[HostSettings]:
    return [HostSettings(name="local", transport="local", queue="local", workdir="work")]


def _duplicates(names) -> list[str]:
    seen, dupes = set(), []
    for name in names:
        if name in seen and name not in dupes:
            dupes.append(name)
        seen.add(name)
    return dupes


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        extra="forbid",
        validate_default=True,
    )

    timezone: str = "Asia/Seoul"
    state_dir: Path = Field(Path(".mqi"), description="local queue, embedded Prefect home, logs")
    inbox: InboxSettings = Field(default_factory=InboxSettings)
    results_dir: Path = Path("results")
    ledger: LedgerSettings = Field(default_factory=LedgerSettings)
    case: CaseSettings = Field(default_factory=CaseSettings)
    hosts: list[HostSettings] = Field(default_factory=_default_hosts)
    transfer: TransferSettings = Field(default_factory=TransferSettings)
    retry: RetrySettings = Field(default_factory=RetrySettings)
    prefect: PrefectSettings = Field(default_factory=PrefectSettings)

    @field_validator("timezone")
    @classmethod
    def _known_timezone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {value!r} (use an IANA name like Asia/Seoul)") from None
        return value

    @field_validator("hosts")
    @classmethod
    def _unique_hosts(cls, hosts: list[HostSettings]) -> list[HostSettings]:
        if not hosts:
            raise ValueError("at least one host is required")
        duplicates = _duplicates(h.name for h in hosts)
        if duplicates:
            raise ValueError(f"duplicate host names: {', '.join(duplicates)}")
        return hosts

    @model_validator(mode="after")
    def _absolute_paths(self) -> Settings:
        # Resolved once, here: flow runs and detached tasks work in other folders.
        self.state_dir = self.state_dir.expanduser().resolve()
        self.results_dir = self.results_dir.expanduser().resolve()
        self.inbox.path = self.inbox.path.expanduser().resolve()
        return self

    @property
    def tz(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)

    def host(self, name: str) -> HostSettings:
        for host in self.hosts:
            if host.name == name:
                return host
        raise ConfigError([f"no host named {name!r} (configured: {', '.join(h.name for h in self.hosts)})"])

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings, file_secret_settings):
        # init carries the YAML file's content (see load_settings); the environment wins over it.
        return (env_settings, init_settings)

    def masked(self) -> dict[str, Any]:
        """The effective settings as plain data, secrets masked, for display."""
        data = self.model_dump(mode="json")  # SecretStr dumps as '**********'
        data["ledger"]["url"] = self.ledger.display_url()
        return data


def load_settings(explicit: Path | None = None) -> Settings:
    """Read the settings, or raise ConfigError naming every problem found and where it is:
    a dotted key of the file, or the `MQI_` variable that gave the value."""
    path, named = config_path(explicit)
    data = _read_yaml(path, required=named)
    try:
        return Settings(**data)
    except ValidationError as exc:
        errors = exc.errors()
        located = [_locate(error, data) for error in errors]
        problems = [_describe(error, where) for error, (where, _) in zip(errors, located)]
        # Pydantic skips list-level checks when an item is invalid; name duplicates anyway.
        problems += [p for p in _duplicate_names(data) if p not in problems]
        in_environment = sum(from_variable for _, from_variable in located)
        source = _source(path, from_file=len(problems) > in_environment, from_environment=in_environment > 0)
        raise ConfigError(problems, source=source) from None
    except SettingsError as exc:
        raise ConfigError(_variables_not_json() or [str(exc)], source=ENVIRONMENT) from None


ENVIRONMENT = "the MQI_ environment variables"


def _source(path: Path, from_file: bool, from_environment: bool) -> str:
    if from_environment:
        return f"{path} and {ENVIRONMENT}" if from_file else ENVIRONMENT
    return str(path)


def _locate(error: dict[str, Any], file_data: dict[str, Any]) -> tuple[str, bool]:
    """Where the value an error is about came from, and whether that is the environment:
    `MQI_CASE__POLL_SECONDS`, `MQI_HOSTS: 0.name` (inside a variable's JSON), or the file's
    dotted key `case.poll_seconds`."""
    loc = error["loc"]
    variable = _variable_behind(loc, file_data)
    if variable is None:
        return ".".join(str(part) for part in loc) or "(top level)", False
    name, rest = variable
    return (f"{name}: {'.'.join(str(part) for part in rest)}" if rest else name), True


def _variable_behind(loc: tuple, file_data: dict[str, Any]) -> tuple[str, tuple] | None:
    """The `MQI_` variable that gave the value at `loc` and the rest of `loc` inside its JSON
    value, or None when the value is the file's. Names match in any case, as in pydantic-settings;
    the environment wins over the file."""
    names = {name.upper(): name for name in os.environ}
    for end in range(len(loc), 0, -1):
        name = names.get(ENV_PREFIX + "__".join(str(part) for part in loc[:end]).upper())
        if name is not None:
            rest = loc[end:]
            # A section given whole as JSON is merged with the file's: the key may be the file's.
            given = not rest or _holds(_json_or_none(os.environ[name]), rest) or not _holds(file_data, loc)
            return (name, rest) if given else None
    return None


def _holds(data: Any, loc: tuple) -> bool:
    for part in loc:
        if isinstance(data, dict) and part in data:
            data = data[part]
        elif isinstance(data, list) and isinstance(part, int) and 0 <= part < len(data):
            data = data[part]
        else:
            return False
    return True


def _json_or_none(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return None


def _variables_not_json() -> list[str]:
    """pydantic-settings reads a whole section or list given in one variable (`MQI_CASE`,
    `MQI_HOSTS`) as JSON, and stops at the first that is not."""
    problems = []
    for name, value in os.environ.items():
        field = _COMPOUND_VARIABLES.get(name.upper())
        if field is None:
            continue
        try:
            json.loads(value)
        except ValueError as error:
            problems.append(f"{name}: not valid JSON ({error}); a whole '{field}' in one variable is JSON")
    return problems


def _is_compound(annotation: Any) -> bool:
    return get_origin(annotation) is list or (isinstance(annotation, type) and issubclass(annotation, BaseModel))


#: the variables that give a whole section or list, e.g. MQI_HOSTS -> hosts
_COMPOUND_VARIABLES = {
    ENV_PREFIX + name.upper(): name
    for name, field in Settings.model_fields.items()
    if _is_compound(field.annotation)
}


def _duplicate_names(data: dict[str, Any]) -> list[str]:
    hosts = data.get("hosts")
    if not isinstance(hosts, list):
        return []
    host_dicts = [h for h in hosts if isinstance(h, dict)]
    problems = []
    duplicates = _duplicates(h.get("name") for h in host_dicts if h.get("name"))
    if duplicates:
        problems.append(f"hosts: duplicate host names: {', '.join(duplicates)}")
    for index, host in enumerate(hosts):
        groups = host.get("groups") if isinstance(host, dict) else None
        if isinstance(groups, list):
            names = [g.get("name") for g in groups if isinstance(g, dict) and g.get("name")]
            if duplicates := _duplicates(names):
                problems.append(f"hosts.{index}: duplicate group names: {', '.join(duplicates)}")
    return problems


def _read_yaml(path: Path, *, required: bool) -> dict[str, Any]:
    if not path.exists():
        if required:
            raise ConfigError([f"config file {str(path)!r} not found"])
        return {}
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_SettingsLoader)
    except _DuplicateKeys as exc:
        raise ConfigError([f"{path}: {problem}" for problem in exc.problems]) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        reason = getattr(exc, "problem", None) or str(exc)
        raise ConfigError([f"{path}: YAML syntax error{where}: {reason}"]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([f"{path}: cannot read: {exc}"]) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError([f"{path}: the top level must be a mapping of settings"])
    return data


class _DuplicateKeys(Exception):
    def __init__(self, problems: list[str]):
        super().__init__(problems)
        self.problems = problems


class _SettingsLoader(yaml.SafeLoader):
    """Safe YAML that refuses a key given twice in one mapping, where PyYAML would keep the
    last silently (an edit appended below an old value that was meant to replace it)."""

    def construct_document(self, node: yaml.Node) -> Any:
        problems = [problem for _, problem in sorted(_duplicate_keys(node))]
        if problems:
            raise _DuplicateKeys(problems)
        return super().construct_document(node)


def _duplicate_keys(
    node: yaml.Node, where: str = "", visited: set[int] | None = None
) -> Iterator[tuple[int, str]]:
    """(first line, problem) for every key that a mapping in `node` holds more than once."""
    visited = set() if visited is None else visited
    if id(node) in visited:  # an alias of a node already seen (or of one of its parents)
        return
    visited.add(id(node))
    if isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            yield from _duplicate_keys(item, f"{where}[{index}]", visited)
    elif isinstance(node, yaml.MappingNode):
        lines: dict[tuple[str, str], list[int]] = {}
        for key, value in node.value:
            if isinstance(key, yaml.ScalarNode):
                lines.setdefault((key.tag, key.value), []).append(key.start_mark.line + 1)
                yield from _duplicate_keys(value, f"{where}.{key.value}" if where else key.value, visited)
        for (_, key), at in lines.items():
            if len(at) > 1:
                yield at[0], _key_given_more_than_once(key, where, at)


def _key_given_more_than_once(key: str, where: str, lines: list[int]) -> str:
    times = "twice" if len(lines) == 2 else f"{len(lines)} times"
    listed = ", ".join(map(str, lines[:-1])) + f" and {lines[-1]}"
    inside = f" in {where!r}" if where else ""
    return f"key {key!r}{inside} appears {times} (lines {listed})"


def _describe(error: dict[str, Any], where: str) -> str:
    if error["type"] == "extra_forbidden":
        return f"{where}: unknown key"
    if error["type"] == "missing":
        return f"{where}: required"
    return f"{where}: {error['msg'].removeprefix('Value error, ')}"
