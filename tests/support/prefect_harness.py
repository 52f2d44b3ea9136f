"""One temporary Prefect server for the whole test session, started only if a test asks for it.

`prefect_server` wraps Prefect's own `prefect_test_harness` (a server on a temporary SQLite
database and a free port). Starting it costs 10 to 20 s, so it is session-scoped, and prefect
is imported only when the fixture is first requested.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

STARTUP_TIMEOUT = 120  # seconds; the 2-CPU test machines are shared with other test runs


@pytest.fixture(scope="session")
def prefect_server() -> Iterator[str]:
    """The API URL of the session's Prefect server; Prefect in this process already points at it."""
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_ANALYTICS_ENABLED, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    # No telemetry from tests (the harness server inherits these settings).
    with temporary_settings({PREFECT_SERVER_ANALYTICS_ENABLED: False}):
        with prefect_test_harness(server_startup_timeout=STARTUP_TIMEOUT):
            yield PREFECT_API_URL.value()
