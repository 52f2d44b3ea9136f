"""The main job's side of `mqi.job_socket`: it answers `mqi status` and `mqi show` from its
warm ledger, exactly as those commands would print them.

A request is one JSON line, `{"digest": ..., "args": ["show", "12", "--json"], "color": false}`;
the reply is `{"stdout": ..., "stderr": ..., "exit_code": n}`, or `{}` when the command should
run in the asking process instead (other settings, arguments the command line must explain,
too many questions at once, an unexpected error). The arguments are parsed by the commands'
own click definitions, so both paths accept the same.
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
from mqi.settings_inputs import SettingsInputs

log = logging.getLogger(__name__)

_OUTPUTS = {"status": status_output, "show": show_output}
# A client that connects and says nothing does not hold a thread for longer than this.
REQUEST_TIMEOUT_SECONDS = 5.0
MAX_REQUEST_BYTES = 64 * 1024
# Answers at once; more askers (a monitoring loop) read the ledger themselves instead of
# taking time from the case threads.
MAX_ANSWERS_AT_ONCE = 2


class JobAnswers:
    """While entered, a thread answers quick commands on the socket of these settings."""

    def __init__(self, ledger: Ledger, zone: tzinfo, inputs: SettingsInputs):
        """`inputs`: what this job's settings were read from, taken before they were read."""
        self.ledger = ledger
        self.zone = zone
        self.inputs = inputs
        self.answered = 0
        self._digest = inputs.digest()
        self._room = threading.BoundedSemaphore(MAX_ANSWERS_AT_ONCE)
        self._server: socketserver.ThreadingUnixStreamServer | None = None
        self._commands = typer.main.get_command(app).commands

    def __enter__(self) -> JobAnswers:
        try:
            self._server = self._serve()
        except OSError as error:  # a shortcut only: the job runs on without it
            log.warning("`mqi status` and `mqi show` will read the ledger themselves: no socket in %s (%s)",
                        job_socket.socket_dir(), error)
        return self

    def _serve(self) -> socketserver.ThreadingUnixStreamServer:
        folder = job_socket.private_socket_dir(create=True)
        if folder is None:
            raise OSError("the folder is not this user's alone")
        path = job_socket.socket_path(folder, self.inputs)
        path.unlink(missing_ok=True)  # left by a job that was killed; the run locks keep out a live one
        server = socketserver.ThreadingUnixStreamServer(str(path), self._handler())
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, name="job-answers", daemon=True).start()
        return server

    def __exit__(self, *exc_info) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            Path(self._server.server_address).unlink(missing_ok=True)
            self._server = None

    @property
    def path(self) -> Path | None:
        return Path(self._server.server_address) if self._server else None

    def reply(self, request: object) -> dict[str, Any]:
        if not isinstance(request, dict) or request.get("digest") != self._digest:
            return {}  # other settings: the asker reads its own ledger
        args = request.get("args")
        if not isinstance(args, list) or not args or not all(isinstance(a, str) for a in args):
            return {}
        if args[0] not in _OUTPUTS or not self._room.acquire(blocking=False):
            return {}
        try:
            return self._answer(args, bool(request.get("color")))
        finally:
            self._room.release()

    def _answer(self, args: list[str], color: bool) -> dict[str, Any]:
        command = self._commands[args[0]]
        try:
            params = command.make_context(args[0], args[1:]).params
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
        return {"stdout": text if color else click.unstyle(text), "stderr": "", "exit_code": 0}

    def _handler(self):
        answers = self

        class Handler(socketserver.StreamRequestHandler):
            timeout = REQUEST_TIMEOUT_SECONDS

            def handle(self) -> None:
                try:
                    request = json.loads(self.rfile.readline(MAX_REQUEST_BYTES))
                    self.wfile.write(json.dumps(answers.reply(request)).encode())
                except (OSError, ValueError):  # silent, gone or garbled asker: it runs the command itself
                    pass

        return Handler

