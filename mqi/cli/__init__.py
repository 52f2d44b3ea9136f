"""The `mqi` command line. Importing the command modules registers their commands."""

from mqi.cli import cases, config, hosts, ops, orchestrate  # noqa: F401  (registers commands)
from mqi.cli.app import app


def main() -> None:
    app()
