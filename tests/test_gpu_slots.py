"""GPU slots as Prefect global concurrency limits: taken, refused when full, given back."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from mqi.site import gpu_limit_name
from tasks import publish


class BusyThenFreeApi(BaseHTTPRequestHandler):
    """Answers the first `busy` POSTs with 503, as a Prefect server on SQLite does when a write
    collides ("database is locked"), then grants a lease."""

    busy = 2
    requests: list[str] = []

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        type(self).requests.append(self.path)
        if len(type(self).requests) <= self.busy:
            self._answer(503, {"exception_message": "Service Unavailable"})
        else:
            self._answer(200, {"lease_id": "6a0f2c3e-0000-4000-8000-000000000001", "limits": []})

    def _answer(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def busy_api():
    from prefect.settings import PREFECT_API_URL, temporary_settings

    BusyThenFreeApi.requests = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), BusyThenFreeApi)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    with temporary_settings({PREFECT_API_URL: f"http://127.0.0.1:{server.server_port}/api"}):
        yield BusyThenFreeApi
    server.shutdown()


def test_a_busy_server_is_asked_again_promptly_not_after_prefects_long_back_off(busy_api, monkeypatch):
    pauses = []
    monkeypatch.setattr(publish.time, "sleep", pauses.append)

    assert publish._take_slot("gpu:host/gpu0") == "6a0f2c3e-0000-4000-8000-000000000001"

    assert busy_api.requests == ["/api/v2/concurrency_limits/increment-with-lease"] * 3
    assert len(pauses) == 2 and max(pauses) < 0.5  # Prefect's own client waits 2 s and more per 503


def test_slots_are_refused_when_full_and_free_again_once_given_back(prefect_server):
    from prefect import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate

    name = gpu_limit_name(f"slots-test-{threading.get_ident()}", "gpu0")
    with get_client(sync_client=True) as client:
        client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=2))

    first, second = publish._take_slot(name), publish._take_slot(name)
    assert first and second and first != second
    assert publish._take_slot(name) is None  # full: the case tries its other groups, then waits
    publish._release_lease(first)
    third = publish._take_slot(name)
    assert third is not None
    for lease in (second, third):
        publish._release_lease(lease)
