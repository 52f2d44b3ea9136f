"""Shared fixtures. Each area keeps its fixtures in its own plugin module under tests/support."""

pytest_plugins = [
    "tests.support.sshd",
    "tests.support.pueue_fixtures",
    "tests.support.databases",
    "tests.support.prefect_harness",
]
