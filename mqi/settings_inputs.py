"""What decides a process's settings, readable without loading them.

The settings come from the settings file, the `MQI_` environment and, for relative paths, the
working folder. Loading them needs pydantic-settings (about 0.3 s to import); this module
needs only the standard library, so that `mqi status` can find the running main job that
has the same settings before it imports anything heavy (`mqi.job_socket`).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

ENV_PREFIX = "MQI_"
CONFIG_ENV = "MQI_CONFIG"
DEFAULT_CONFIG_FILE = Path("mqi.yaml")


def config_path(explicit: Path | None = None, environ: Mapping[str, str] = os.environ) -> tuple[Path, bool]:
    """The config file to read and whether the user named it (a named file must exist)."""
    if explicit is not None:
        return explicit, True
    if environ.get(CONFIG_ENV):
        return Path(environ[CONFIG_ENV]), True
    return DEFAULT_CONFIG_FILE, False


@dataclass(frozen=True)
class SettingsInputs:
    """Everything the settings are made from: the file (its real path and content), the other
    `MQI_` variables (any case: pydantic-settings ignores it), the PostgreSQL client's `PG`
    variables (they can choose the ledger's database) and the working folder."""

    config_file: str
    content: str | None  # sha256 of the file; None: no file, the embedded defaults
    variables: tuple[tuple[str, str], ...]
    working_folder: str

    @classmethod
    def of_this_process(cls, explicit: Path | None = None, environ: Mapping[str, str] = os.environ) -> SettingsInputs:
        path = os.path.realpath(config_path(explicit, environ)[0])
        try:
            with open(path, "rb") as file:
                content = hashlib.sha256(file.read()).hexdigest()
        except OSError:
            content = None
        variables = tuple(sorted((k, v) for k, v in environ.items() if _shapes_settings(k)))
        return cls(path, content, variables, os.getcwd())

    def digest(self) -> str:
        """Equal for two processes exactly when they read the same settings; a file edited in
        between gives another digest."""
        return _sha256([self.config_file, self.content, self.variables, self.working_folder])

    def public_digest(self) -> str:
        """The same without the variables' values (passwords) and the file's content: safe to
        show, as in a socket's name that every local user can list."""
        return _sha256([self.config_file, [name for name, _ in self.variables], self.working_folder])


def _shapes_settings(name: str) -> bool:
    upper = name.upper()
    return (upper.startswith(ENV_PREFIX) and upper != CONFIG_ENV) or upper.startswith("PG")


def _sha256(value: object) -> str:
    return hashlib.sha256(json.dumps(value).encode("utf-8", "surrogateescape")).hexdigest()
