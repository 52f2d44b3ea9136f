"""The `mqi` command line.

`main` first lets the running main job answer a quick command (`mqi.job_socket`): this
package imports nothing heavy until the full command line is needed. Importing the command
modules registers their commands on `app`.
"""

import sys


def main() -> None:
    from mqi.job_socket import ask_running_job

    exit_code = ask_running_job(sys.argv[1:])
    if exit_code is not None:
        sys.exit(exit_code)
    full_app()()


def full_app():
    """The typer app with every command registered."""
    from mqi.cli import cases, config, hosts, ops, orchestrate  # noqa: F401  (registers commands)
    from mqi.cli.command_line import app

    return app


def __getattr__(name: str):
    if name == "app":  # `from mqi.cli import app`
        return full_app()
    raise AttributeError(name)
