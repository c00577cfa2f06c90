"""Ways to run the simulator: on a thread of this process, in a child process, from the command line.

start() serves it in-process on a daemon thread (the payment server's `python server.py` and the
tests); start_process() starts `python -m simulator` as a child process and waits until it
answers (`python server.py` with SIMULATOR_PORT); main() is that command, which serve.py has
uWSGI's master run, so every worker shares one simulator.
"""

from __future__ import annotations

import argparse
import logging
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import requests
from flask import Flask
from werkzeug.serving import WSGIRequestHandler, make_server

from mpesa import SANDBOX_SHORTCODE
from simulator.app import create_app
from simulator.controls import SimulatorConfig
from simulator.engine import Simulator
from telemetry.logs import mask_phones_on

# The directory `python -m simulator` must run from to import the package and mpesa.
_ROOT = Path(__file__).resolve().parent.parent


def _base_url(host: str, port: int) -> str:
    return f"http://{f'[{host}]' if ':' in host else host}:{port}"


class _QuietRequestHandler(WSGIRequestHandler):
    """No access log: paths and queries carry phone numbers; our own log lines mask them."""

    def log_request(self, *args) -> None:
        return  # nothing logged, on purpose


class RunningSimulator:
    """A simulator serving HTTP on a daemon thread; stop() shuts it down."""

    def __init__(self, server, thread: threading.Thread, app: Flask, host: str):
        self._server = server
        self._thread = thread
        self.app = app
        self.port: int = server.server_port
        self.url = _base_url(host, self.port)

    @property
    def state(self) -> Simulator:
        """The served simulator's state and behaviour."""
        return self.app.extensions["simulator"]

    def wait(self) -> None:
        """Block until the server stops (Ctrl-C interrupts the wait)."""
        self._thread.join()

    def stop(self) -> None:
        """Shut the server down and stop the simulator's threads."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
        self.state.close()

    def __enter__(self) -> RunningSimulator:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start(
    host: str = "127.0.0.1",
    port: int = 0,
    config: SimulatorConfig | None = None,
    *,
    clock: Callable[[], float] = time.monotonic,
) -> RunningSimulator:
    """Serve a new simulator on host:port (0 = a free port) from a daemon thread."""
    app = create_app(config, clock=clock)
    server = make_server(host, port, app, threaded=True, request_handler=_QuietRequestHandler)
    # A short poll interval makes stop() return quickly; idle polling costs next to nothing.
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="simulator-http", daemon=True
    )
    thread.start()
    return RunningSimulator(server, thread, app, host)


class SimulatorProcess:
    """A simulator in a child process (`python -m simulator`); stop() ends it."""

    def __init__(self, process: subprocess.Popen, url: str):
        self.process = process
        self.url = url

    def stop(self) -> None:
        """Terminate the child, and kill it if it has not exited within five seconds."""
        if self.process.poll() is None:
            self.process.terminate()
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def __enter__(self) -> SimulatorProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _free_port(host: str) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def start_process(host: str = "127.0.0.1", port: int = 0, timeout: float = 10.0) -> SimulatorProcess:
    """Start `python -m simulator` on host:port (0 = a free port) and return once it answers.

    Raises RuntimeError, with the child ended, if it exits first or does not answer
    GET /simulator/health within `timeout` seconds.
    """
    port = port or _free_port(host)
    url = _base_url(host, port)
    command = [sys.executable, "-m", "simulator", "--host", host, "--port", str(port)]
    child = SimulatorProcess(subprocess.Popen(command, cwd=_ROOT), url)
    deadline = time.monotonic() + timeout
    while True:
        code = child.process.poll()
        if code is not None:
            raise RuntimeError(f"the Daraja simulator exited with status {code} before answering at {url}")
        try:
            wait = min(0.5, max(deadline - time.monotonic(), 0.05))
            if requests.get(url + "/simulator/health", timeout=wait).status_code == 200:
                return child
        except requests.RequestException:
            pass  # not listening yet
        if time.monotonic() >= deadline:
            child.stop()
            raise RuntimeError(f"the Daraja simulator did not answer at {url} within {timeout:g}s")
        time.sleep(0.05)


def main(argv: list[str] | None = None) -> None:
    """python -m simulator: serve a simulator until Ctrl-C."""
    defaults = SimulatorConfig()
    parser = argparse.ArgumentParser(
        prog="python -m simulator", description="A local Daraja (M-Pesa Express) simulator."
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default %(default)s)")
    parser.add_argument("--port", type=int, default=8089, help="port, 0 for any free one (default %(default)s)")
    parser.add_argument("--pin", default=defaults.pin, help="the handset PIN that pays (default %(default)s)")
    parser.add_argument(
        "--auto-delay",
        type=float,
        default=defaults.auto_delay,
        help="seconds before test numbers answer (default %(default)s)",
    )
    parser.add_argument(
        "--prompt-timeout",
        type=float,
        default=defaults.prompt_timeout,
        help="seconds an unanswered prompt waits before 1037 (default %(default)s)",
    )
    parser.add_argument(
        "--token-ttl",
        type=int,
        default=defaults.token_ttl,
        help="access token lifetime in seconds (default %(default)s)",
    )
    parser.add_argument(
        "--query-min-interval",
        type=float,
        default=defaults.query_min_interval,
        help="seconds between queries of one CheckoutRequestID (default %(default)s)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for handler in logging.getLogger().handlers:
        mask_phones_on(handler)  # as the payment server's: no phone number in any line
    config = SimulatorConfig(
        pin=args.pin,
        auto_delay=args.auto_delay,
        prompt_timeout=args.prompt_timeout,
        token_ttl=args.token_ttl,
        query_min_interval=args.query_min_interval,
    )
    running = start(args.host, args.port, config)  # werkzeug explains a failed bind itself and exits 1
    print(
        f"Daraja simulator on {running.url} (consumer key {config.consumer_key}, "
        f"shortcode {SANDBOX_SHORTCODE}, PIN {config.pin}); Ctrl-C stops it",
        flush=True,
    )
    try:
        running.wait()
    except KeyboardInterrupt:
        running.stop()
