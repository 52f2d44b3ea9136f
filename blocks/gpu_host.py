"""The GPU host block: a host's connection and groups kept in Prefect instead of the YAML file.

A site that manages credentials in Prefect saves one `GpuHost` block per server and names it in
the settings (`hosts: [{name: gpu1, block: gpu1}]`). The orchestrator calls
`resolve_host_blocks` once at start; from then on the host is a plain `HostSettings`, the same
model the YAML path produces, so nothing downstream can tell where it came from.
"""

from __future__ import annotations

import atexit
import copy
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Literal

import httpx
from prefect.blocks.core import Block
from prefect.exceptions import PrefectException
from prefect.settings import PREFECT_API_URL
from pydantic import Field, SecretStr, ValidationError, model_validator

from mqi.errors import ConfigError
from mqi.settings import GroupSettings, HostSettings, Settings

# HostSettings fields a block carries: everything but the host's name in the settings and the
# block reference itself.
_HOST_FIELDS = [field for field in HostSettings.model_fields if field not in ("name", "block")]


def _as_in_host_settings(field: str) -> Any:
    """HostSettings' definition of a field (default, limits, description): one definition for both."""
    return copy.copy(HostSettings.model_fields[field])


class GpuHost(Block):
    """A GPU server for MQI Communicator: how to reach it and its pueue groups.

    The fields mean the same as a host entry in the settings file. The private key may be kept
    here (`private_key`) or stay a file on the orchestrator machine (`key_file`), not both.
    """

    _block_type_name = "MQI GPU Host"
    _block_type_slug = "mqi-gpu-host"

    transport: Literal["ssh", "local"] = _as_in_host_settings("transport")
    queue: Literal["pueue", "local"] = _as_in_host_settings("queue")
    hostname: str | None = _as_in_host_settings("hostname")
    port: int = _as_in_host_settings("port")
    username: str | None = _as_in_host_settings("username")
    key_file: Path | None = _as_in_host_settings("key_file")
    private_key: SecretStr | None = Field(
        None, description="the private key itself (OpenSSH or PEM text), instead of key_file"
    )
    key_passphrase: SecretStr | None = _as_in_host_settings("key_passphrase")
    password: SecretStr | None = _as_in_host_settings("password")
    known_hosts: Path = _as_in_host_settings("known_hosts")
    accept_unknown_host_keys: bool = _as_in_host_settings("accept_unknown_host_keys")
    connect_timeout: float = _as_in_host_settings("connect_timeout")
    command_timeout: float = _as_in_host_settings("command_timeout")
    pueue: str = _as_in_host_settings("pueue")
    pueue_pid_file: str | None = _as_in_host_settings("pueue_pid_file")
    nvidia_smi: str = _as_in_host_settings("nvidia_smi")
    avoid_foreign_gpu_processes: bool = _as_in_host_settings("avoid_foreign_gpu_processes")
    workdir: str = _as_in_host_settings("workdir")
    groups: list[GroupSettings] = _as_in_host_settings("groups")

    @model_validator(mode="after")
    def _one_key_source(self) -> GpuHost:
        if self.private_key is not None and self.key_file is not None:
            raise ValueError("give either private_key or key_file, not both")
        return self

    def to_host_settings(self, name: str) -> HostSettings:
        """The host as settings under `name`, validated exactly as a host from the YAML file.

        A `private_key` is written to a file only this user can read, removed at process exit.
        Raises ConfigError naming the block and every problem found.
        """
        fields = {field: getattr(self, field) for field in _HOST_FIELDS}
        if self.private_key is not None:
            fields["key_file"] = _write_private_key(self.private_key)
        try:
            return HostSettings(name=name, **fields)
        except ValidationError as exc:
            if self.private_key is not None:
                fields["key_file"].unlink()
            where = f"host {name!r} from block {self._block_document_name or '(unsaved)'!r}"
            raise ConfigError([_describe(where, error) for error in exc.errors()]) from None


def resolve_host_blocks(settings: Settings) -> Settings:
    """The settings with every host that names a block replaced by that block's content.

    Loads the blocks from the Prefect API of the current Prefect settings (PREFECT_API_URL);
    returns `settings` itself when no host names a block. Raises ConfigError naming every host
    whose block is missing, unreadable or invalid.
    """
    if not any(host.block for host in settings.hosts):
        return settings
    hosts, problems = [], []
    for host in settings.hosts:
        try:
            hosts.append(_load_host(host) if host.block else host)
        except ConfigError as exc:
            problems += exc.problems
    if problems:
        raise ConfigError(problems)
    return settings.model_copy(update={"hosts": hosts})


def _load_host(host: HostSettings) -> HostSettings:
    try:
        # _sync: the orchestrator may call this from async code; the answer is needed right here.
        block = GpuHost.load(host.block, _sync=True)
    except (ValueError, RuntimeError, httpx.HTTPError, PrefectException) as exc:
        # Prefect's own message says what went wrong: no such block, no API URL, unreachable API.
        api = PREFECT_API_URL.value() or "(ephemeral)"
        raise ConfigError(
            [f"host {host.name!r}: cannot load {GpuHost.get_block_type_name()!r} block {host.block!r}"
             f" from the Prefect API {api}: {exc}"]
        ) from None
    return block.to_host_settings(host.name)


def _describe(where: str, error: dict[str, Any]) -> str:
    location = ".".join(str(part) for part in error["loc"])
    message = error["msg"].removeprefix("Value error, ")
    return f"{where}: {location}: {message}" if location else f"{where}: {message}"


_private_key_dir: Path | None = None


def _write_private_key(key: SecretStr) -> Path:
    """Write the key to a new file (mode 0600) in a directory only this user can enter."""
    global _private_key_dir
    if _private_key_dir is None:
        _private_key_dir = Path(tempfile.mkdtemp(prefix="mqi-keys-"))  # mode 0700
        atexit.register(shutil.rmtree, _private_key_dir, ignore_errors=True)
    descriptor, path = tempfile.mkstemp(dir=_private_key_dir, suffix=".key")  # mode 0600
    text = key.get_secret_value()
    # Keys pasted into a form often lose the final newline, which some key parsers require.
    with os.fdopen(descriptor, "w", encoding="ascii") as file:
        file.write(text if text.endswith("\n") else text + "\n")
    return Path(path)
