"""The one Site of this process, built from the settings on first use.

Flow runs started by a worker or `mqi run` find their settings the same way the CLI does
(`MQI_CONFIG` or ./mqi.yaml in the working folder), so every entry point sees one truth.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from mqi.logfile import setup_main_job_logging
from mqi.settings import Settings, load_settings
from mqi.site import Site

_site: Site | None = None
_lock = threading.Lock()
# Called with each Site this process creates (the Prefect layer adds its event publisher).
site_hooks: list[Callable[[Site], None]] = []


def get_site() -> Site:
    global _site
    with _lock:
        if _site is None:  # a flow run in a process of its own (served by `mqi run`, a worker)
            settings = load_settings()
            setup_main_job_logging(settings)
            _site = _with_hooks(Site(settings))
        return _site


def use_site(site: Site | None) -> None:
    """Install a Site for this process (the CLI and tests build theirs from their settings)."""
    global _site
    with _lock:
        _site = site if site is None else _with_hooks(site)


def use_settings(settings: Settings) -> Site:
    site = Site(settings)
    use_site(site)
    return site


def _with_hooks(site: Site) -> Site:
    for hook in site_hooks:
        hook(site)
    return site
