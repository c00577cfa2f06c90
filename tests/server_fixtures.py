"""A real payment server on a loopback port, talking to a real simulator over HTTP."""

from __future__ import annotations

import socket
import threading
from dataclasses import dataclass

import pytest
import requests
from werkzeug.serving import make_server

from config import load_settings
from server import create_app


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class LiveServer:
    url: str
    simulator_url: str
    app: object
    _server: object = None

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server = None
        if "webhooks" in self.app.extensions:
            self.app.extensions["webhooks"].close()
        self.app.extensions["payments"].daraja.close()
        self.app.extensions["store"].close()

    def post(self, path: str, **kwargs) -> requests.Response:
        return requests.post(self.url + path, timeout=30, **kwargs)

    def get(self, path: str, **kwargs) -> requests.Response:
        return requests.get(self.url + path, timeout=30, **kwargs)

    def sim(self, method: str, path: str, **kwargs) -> requests.Response:
        """Drive the simulator's control API (the handset, scenarios, faults)."""
        return requests.request(method, self.simulator_url + path, timeout=30, **kwargs)


SERVER_DEFAULTS = {
    "MPESA_ENV": "simulator",
    "RATELIMIT_ENABLED": "false",
    "STORE_URL": "memory://",
    "CALLBACK_TOKEN": "test-callback-token-0123456789",
}


@pytest.fixture
def live_server_factory(simulator):
    """Start servers with settings given as environment strings: factory(TRANSACTION_TTL="3")."""
    started: list[LiveServer] = []

    def start(**env) -> LiveServer:
        port = free_port()
        environ = {
            **SERVER_DEFAULTS,
            "MPESA_BASE_URL": simulator.url,
            "PORT": str(port),
            "CALLBACK_URL": f"http://127.0.0.1:{port}",
            **env,
        }
        app = create_app(load_settings(environ))
        server = make_server("127.0.0.1", port, app, threaded=True)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        live = LiveServer(f"http://127.0.0.1:{port}", simulator.url, app, server)
        started.append(live)
        return live

    yield start
    for live in started:
        live.stop()


@pytest.fixture
def live_server(live_server_factory) -> LiveServer:
    return live_server_factory()
