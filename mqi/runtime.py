"""The one Site of this process, built from the settings on first use.

Flow runs started by a worker or `mqi run` find their settings the same way the CLI does
(`MQI_CONFIG` or ./mqi.yaml in the working folder), so every entry point sees one truth.
"""

from __future__ import annotations

import threading

from mqi.logfile import setup_main_job_logging
from mqi.settings import Settings, load_settings
from mqi.site import Site

_site: Site | None = None
_lock = threading.Lock()


def get_site() -> Site:
    global _site
    with _lock:
        if _site is None:  # a flow run in a process of its own (served by `mqi run`, a worker)
            settings = load_settings()
            setup_main_job_logging(settings)
            _site = Site(settings)
        return _site


def use_site(site: Site | None) -> None:
    """Install a Site for this process (the CLI and tests build theirs from their settings)."""
    global _site
    with _lock:
        _site = site


def use_settings(settings: Settings) -> Site:
    site = Site(settings)
    use_site(site)
    return site
