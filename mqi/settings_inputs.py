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


def inputs_digest(explicit: Path | None = None, environ: Mapping[str, str] = os.environ) -> str:
    """A digest of everything the settings are made from: the file (its absolute path and its
    content), the other `MQI_` variables and the working folder. Two processes with the same
    digest read the same settings; any difference (a file edited since) gives another digest."""
    path, _ = config_path(explicit, environ)
    path = Path(os.path.abspath(path))
    try:
        content = hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        content = None  # no file: the embedded defaults (or an error both would report)
    variables = sorted((k, v) for k, v in environ.items() if k.startswith(ENV_PREFIX) and k != CONFIG_ENV)
    inputs = json.dumps([str(path), content, variables, os.getcwd()])
    return hashlib.sha256(inputs.encode("utf-8", "surrogateescape")).hexdigest()
