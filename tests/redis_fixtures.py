"""A Redis for the tests: a throwaway redis-server, else local database 15, else a loud skip.

`redis_url` (session) starts `redis-server` on a free port with persistence off, in a
temporary directory, and stops it when the session ends. Without the binary it uses
redis://127.0.0.1:6379/15 if something answers there (that database is flushed). Tests
that need Redis ask for `clean_redis_url`, which empties the database first.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest
import redis

FALLBACK_URL = "redis://127.0.0.1:6379/15"
START_TIMEOUT = 10.0


def _answers(url: str, timeout: float = 0.5) -> bool:
    client = redis.Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout)
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _start_server(binary: str, directory: Path) -> tuple[subprocess.Popen, str]:
    """Start redis-server on a free port; retry if another process takes the port first."""
    logfile = directory / "redis.log"
    for _ in range(3):
        port = _free_port()
        process = subprocess.Popen(
            [
                binary,
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(directory),
                "--logfile",
                str(logfile),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        url = f"redis://127.0.0.1:{port}/0"
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline and process.poll() is None:
            if _answers(url):
                return process, url
            time.sleep(0.02)
        _stop(process)
    log_tail = logfile.read_text(errors="replace")[-800:] if logfile.exists() else "(no log)"
    raise RuntimeError(f"redis-server did not start:\n{log_tail}")


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory):
    """URL of a Redis database the test session may flush at will."""
    binary = shutil.which("redis-server")
    problem = "redis-server is not installed"
    if binary:
        try:
            process, url = _start_server(binary, tmp_path_factory.mktemp("redis"))
        except RuntimeError as exc:
            problem = str(exc)
        else:
            try:
                yield url
            finally:
                _stop(process)
            return
    if _answers(FALLBACK_URL):
        redis.Redis.from_url(FALLBACK_URL).flushdb()
        yield FALLBACK_URL
        return
    pytest.skip(
        f"!!! REDIS TESTS NOT RUN: {problem} and nothing answers PING at "
        f"{FALLBACK_URL}. Install redis-server (`make services`) to run them. !!!"
    )


@pytest.fixture
def clean_redis_url(redis_url):
    """The session's Redis URL, its database emptied for this test."""
    client = redis.Redis.from_url(redis_url)
    try:
        client.flushdb()
    finally:
        client.close()
    return redis_url
