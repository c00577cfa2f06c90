"""Fixtures for tests that talk to the Daraja simulator over real loopback HTTP.

- `simulator`: one simulator per test session on a free loopback port, reset and given
  the fast TEST_SETTINGS before each test (issued tokens stay valid across tests).
- `callback_receiver`: a real HTTP server in a thread recording the JSON POSTed to it.
- `ManualClock`: a clock a test moves by hand, for `simulator.start(clock=...)`.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

import simulator as sim

# Fast but otherwise Daraja-like: test numbers answer in 50 ms, prompts expire in 5 s.
TEST_SETTINGS = {
    "pin": sim.SIM_PIN,
    "auto_delay": 0.05,
    "prompt_timeout": 5.0,
    "query_min_interval": 0.1,
    "token_ttl": 3599,
    "timestamp_skew": 600,
    "invalidate_previous_tokens": False,
}


class ManualClock:
    """A monotonic clock that only moves when told to."""

    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture(scope="session")
def simulator_session():
    running = sim.start("127.0.0.1", 0)
    yield running
    running.stop()


@pytest.fixture
def simulator(simulator_session):
    """A running simulator (`.url`, `.app`, `.port`), freshly reset with TEST_SETTINGS."""
    state = simulator_session.state  # in-process: the same calls as POST /simulator/reset and PATCH /config
    state.reset()
    state.update_config(TEST_SETTINGS)
    yield simulator_session
    state.reset()  # cancels timers, so nothing fires into the next test


class CallbackReceiver:
    """A tiny HTTP server that records every POSTed JSON body and answers `status`."""

    def __init__(self, host: str = "127.0.0.1"):
        self.calls: list[dict] = []  # {"path", "headers", "body"} in arrival order
        self.status = 200
        self._cond = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                try:
                    body = json.loads(raw)
                except ValueError:
                    body = raw.decode("utf-8", "replace")
                with receiver._cond:
                    receiver.calls.append({"path": self.path, "headers": dict(self.headers), "body": body})
                    receiver._cond.notify_all()
                answer = json.dumps({"ResultCode": 0, "ResultDesc": "Accepted"}).encode()
                self.send_response(receiver.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args):
                pass

        self._server = ThreadingHTTPServer((host, 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://{host}:{self._server.server_port}/hooks/stk/test-token"
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.005}, daemon=True)
        self._thread.start()

    @property
    def bodies(self) -> list:
        with self._cond:
            return [call["body"] for call in self.calls]

    def wait(self, count: int = 1, timeout: float = 5.0) -> list:
        """Return the first `count` bodies once they have arrived; fail after `timeout`."""
        with self._cond:
            if not self._cond.wait_for(lambda: len(self.calls) >= count, timeout):
                raise AssertionError(f"expected {count} callback(s) within {timeout}s, got {len(self.calls)}")
            return [call["body"] for call in self.calls[:count]]

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture
def callback_receiver():
    receiver = CallbackReceiver()
    yield receiver
    receiver.stop()
