"""The main job's side of `mqi.job_socket`: it answers `mqi status` and `mqi show` from its
warm ledger, exactly as those commands would print them.

A request is one JSON line, `{"args": ["show", "12", "--json"], "color": false}`; the reply is
`{"stdout": ..., "stderr": ..., "exit_code": n}`, or `{}` when the command should run in the
asking process instead (arguments the command line must explain, an unexpected error). The
arguments are parsed by the commands' own click definitions, so both paths accept the same.
"""

from __future__ import annotations

import json
import logging
import socketserver
import threading
from pathlib import Path
from datetime import tzinfo
from typing import Any

import click
import typer

from mqi import job_socket
from mqi.cli.command_line import app
from mqi.cli.cases import show_output, status_output
from mqi.ledger import Ledger, LedgerError

log = logging.getLogger(__name__)

_OUTPUTS = {"status": status_output, "show": show_output}


class JobAnswers:
    """While entered, a thread answers quick commands on the socket of these settings."""

    def __init__(self, ledger: Ledger, zone: tzinfo):
        self.ledger = ledger
        self.zone = zone
        self.answered = 0
        self._server: socketserver.ThreadingUnixStreamServer | None = None
        self._commands = typer.main.get_command(app).commands

    def __enter__(self) -> JobAnswers:
        folder = job_socket.private_socket_dir(create=True)
        if folder is None:
            log.warning("%s is not private to this user: `mqi status` reads the ledger itself",
                        job_socket.socket_dir())
            return self
        path = job_socket.socket_path(folder)  # MQI_CONFIG is exported by now
        path.unlink(missing_ok=True)  # left by a job that was killed; the run locks keep out a live one
        self._server = socketserver.ThreadingUnixStreamServer(str(path), self._handler())
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, name="job-answers", daemon=True).start()
        return self

    def __exit__(self, *exc_info) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            Path(self._server.server_address).unlink(missing_ok=True)
            self._server = None

    @property
    def path(self) -> Path | None:
        return Path(self._server.server_address) if self._server else None

    def reply(self, request: dict[str, Any]) -> dict[str, Any]:
        args = request.get("args")
        if not isinstance(args, list) or not args or args[0] not in _OUTPUTS:
            return {}
        command = self._commands[args[0]]
        try:
            params = command.make_context(args[0], [str(a) for a in args[1:]]).params
        except (click.ClickException, click.exceptions.Exit):
            return {}  # usage errors and --help: the asking process prints them
        try:
            output = _OUTPUTS[args[0]](self.ledger, self.zone, **params)
        except LedgerError as error:
            return {"stdout": "", "stderr": f"error: {error}\n", "exit_code": 1}
        except Exception:
            log.exception("answering `mqi %s`", " ".join(args))
            return {}
        self.answered += 1
        text = output + "\n"
        return {"stdout": text if request.get("color") else click.unstyle(text), "stderr": "", "exit_code": 0}

    def _handler(self):
        answers = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                try:
                    request = json.loads(self.rfile.readline())
                except ValueError:
                    return
                self.wfile.write(json.dumps(answers.reply(request if isinstance(request, dict) else {})).encode())

        return Handler

