"""The `mqi` command line. Importing the command modules registers their commands."""

import importlib.util

from mqi.cli import config  # noqa: F401  (registers commands)
from mqi.cli.app import app

if importlib.util.find_spec("mqi.cli.cases"):  # TODO(lead): import unconditionally once it lands
    from mqi.cli import cases  # noqa: F401


def main() -> None:
    app()
