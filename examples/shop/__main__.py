"""Run the example shop with its payment server: `make shop`, or `python -m examples.shop --help`.

The payment server (`python server.py`, with the settings `make run` would use) listens on
one loopback port; this folder is served on another, as any static host would serve it, with
index.html's data-server pointing at that server and the server's FRONTEND_URL naming the
shop's origin, so the browser lets the shop talk to it. Only the standard library: the
payment server is a program this one starts, not a module it imports.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

SHOP = Path(__file__).resolve().parent
ROOT = SHOP.parent.parent
EXAMPLE_CATALOG = ROOT / "catalog.example.json"
HOST = "127.0.0.1"
START_TIMEOUT = 30.0  # seconds the payment server has to answer /health
STOP_TIMEOUT = 10.0  # seconds it has to stop before it is killed


class Failed(Exception):
    """The shop cannot run; the message is one line saying why."""


class ShopFiles(SimpleHTTPRequestHandler):
    """The shop's files as a static host serves them, index.html pointed at one payment server."""

    def __init__(self, *args, payment_server: str, **kwargs):
        self.payment_server = payment_server
        super().__init__(*args, directory=str(SHOP), **kwargs)

    def do_GET(self):
        if self.is_launcher():
            self.send_error(404)
        elif self.url_path() in ("/", "/index.html"):
            self.send_index()
        else:
            super().do_GET()

    def do_HEAD(self):
        if self.is_launcher():
            self.send_error(404)
        else:
            super().do_HEAD()

    def url_path(self) -> str:
        return urllib.parse.unquote(urllib.parse.urlsplit(self.path).path)

    def is_launcher(self) -> bool:
        """This file and its byte code sit in the folder but are not part of the shop."""
        return self.url_path().endswith(".py") or "__pycache__" in self.url_path()

    def send_index(self) -> None:
        html = (SHOP / "index.html").read_text(encoding="utf-8")
        body = re.sub(r'data-server="[^"]*"', f'data-server="{self.payment_server}"', html, count=1).encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")  # the server's address changes from run to run
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format, *args):
        pass  # the payment server's log tells what the shop asked of it


def port_number(text: str) -> int:
    if not text.isdigit() or int(text) > 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port from 0 to 65535")
    return int(text)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m examples.shop",
        description="Run the example shop (examples/shop/) and the payment server it pays through, "
        "each on its own loopback port. `make shop` runs this with no options.",
        epilog="The payment server gets the settings `make run` would give it, from the environment and "
        ".env (simulator mode unless they name Daraja credentials; CHECKOUT_SECRET, ADMIN_TOKEN, STORE_URL "
        "and the rest apply as usual), except PORT, FRONTEND_URL and CATALOG_FILE, which this command sets. "
        "Example: ADMIN_TOKEN=choose-a-long-random-token make shop",
    )
    parser.add_argument(
        "--shop-port", type=port_number, default=0, metavar="PORT", help="the shop's port (default: a free one)"
    )
    parser.add_argument(
        "--server-port",
        type=port_number,
        default=0,
        metavar="PORT",
        help="the payment server's port (default: a free one)",
    )
    parser.add_argument(
        "--catalog",
        type=Path,
        default=EXAMPLE_CATALOG,
        metavar="FILE",
        help="the catalogue the server sells from, its CATALOG_FILE (default: catalog.example.json)",
    )
    return parser.parse_args(argv)


def reserve(port: int, option: str) -> int:
    """A port the payment server can listen on: the one asked for if it is free, else any free one."""
    try:
        with socket.socket() as sock:
            sock.bind((HOST, port))
            return sock.getsockname()[1]
    except OSError as error:
        raise Failed(cannot_listen(port, error, option)) from None


def cannot_listen(port: int, error: OSError, option: str) -> str:
    return (
        f"Cannot listen on port {port} ({error.strerror}): another program may be using it. "
        f"Leave {option} out for a free port, or choose another."
    )


def serve_shop(port: int, payment_server: str) -> ThreadingHTTPServer:
    try:
        httpd = ThreadingHTTPServer((HOST, port), partial(ShopFiles, payment_server=payment_server))
    except OSError as error:
        raise Failed(cannot_listen(port, error, "--shop-port")) from None
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd


def start_payment_server(port: int, shop_origin: str, catalog: Path) -> subprocess.Popen:
    settings = {"PORT": str(port), "FRONTEND_URL": shop_origin, "CATALOG_FILE": str(catalog.resolve())}
    # A session of its own: Ctrl+C reaches this process only, which then stops the server once.
    return subprocess.Popen(
        [sys.executable, "server.py"],
        cwd=ROOT,
        env={**os.environ, **settings},
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )


def answer(url: str) -> bytes | None:
    """The body of a 200 answer from url, or None while nothing answers there."""
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.read()
    except OSError:
        return None


def wait_for_health(server: subprocess.Popen, url: str) -> dict:
    """The server's /health answer once it gives one; Failed if it stops or keeps silent."""
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise Failed(f"The payment server did not start (exit status {server.returncode}; its reason is above).")
        body = answer(f"{url}/health")
        if body is not None:
            return json.loads(body)
        time.sleep(0.1)
    raise Failed(f"The payment server did not answer {url}/health within {START_TIMEOUT:.0f} s.")


def stop(server: subprocess.Popen) -> None:
    """Stop the server as Ctrl+C stops `make run`; kill it if it will not go."""
    if server.poll() is not None:
        return
    server.send_signal(signal.SIGINT)
    try:
        server.wait(timeout=STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()


def where(shop: str, server: str, health: dict) -> str:
    simulated = health.get("mode") == "simulator"
    lines = [
        "Example shop running",
        f"  Shop:            {shop}/",
        f"  Payment server:  {server}  ({health.get('mode')} mode, FRONTEND_URL={shop})",
    ]
    if simulated:
        lines.append(f"  Simulated phone: {server}/handset.html")
        lines.append("Fill the cart, pay with 0712 345 678 and approve on the simulated phone (it shows the PIN).")
    lines.append("Press Ctrl+C to stop the shop and the payment server.")
    return "\n".join(lines)


def run(options: argparse.Namespace) -> int:
    if not options.catalog.is_file():
        raise Failed(f"--catalog: there is no file {options.catalog}")
    server_port = reserve(options.server_port, "--server-port")
    server_url = f"http://{HOST}:{server_port}"
    httpd = serve_shop(options.shop_port, server_url)
    shop_url = f"http://{HOST}:{httpd.server_port}"
    server = None
    try:
        server = start_payment_server(server_port, shop_url, options.catalog)
        health = wait_for_health(server, server_url)
        if answer(f"{shop_url}/") is None:
            raise Failed(f"The shop does not answer at {shop_url}/.")
        print(where(shop_url, server_url, health), flush=True)
        server.wait()
        raise Failed(f"The payment server stopped (exit status {server.returncode}); the shop is stopped too.")
    except KeyboardInterrupt:
        return 0
    finally:
        # A second Ctrl+C must not cut the clean-up short; stop() kills what will not go.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if server is not None:
            stop(server)
        httpd.shutdown()
        httpd.server_close()


def main(argv: list[str] | None = None) -> int:
    options = parse_args(argv)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # stop on SIGTERM as on Ctrl+C
    try:
        return run(options)
    except Failed as failure:
        print(failure, file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # before anything was started
        return 0


if __name__ == "__main__":
    sys.exit(main())
