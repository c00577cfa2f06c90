"""The fixtures test modules share; the plain helpers behind them are in tests/helpers.py.

- `simulator`: one Daraja simulator per session (`simulator_session`) on a free loopback
  port, reset and given the fast TEST_SETTINGS before each test (issued tokens stay valid).
- `callback_receiver`: a real HTTP server in a thread recording the JSON POSTed to it.
- `live_server_factory`: start payment servers talking to the simulator, with settings given
  as environment strings (`factory(TRANSACTION_TTL="3")`); `live_server`: one with defaults.
- `redis_url` (session): database 15 of a throwaway redis-server on a free port with
  persistence off, else redis://127.0.0.1:6379/15 if something answers there, else a loud
  skip; `clean_redis_url` empties that database first.
- `postgres_url` (session): a throwaway database, created for the session and dropped after
  it, on the PostgreSQL at 127.0.0.1:5432 if one answers (trust auth, user postgres), else
  on one started for the session in a temporary folder (as nobody when we are root), else a
  loud skip, or a failure under REQUIRE_POSTGRES=1 (CI sets it); `clean_postgres_url` empties
  its tables first; `empty_postgres_url` is a database of its own with no tables at all.
- `backend` and `store`: each test that asks runs on memory, SQLite, Redis and PostgreSQL in turn.
- `browser` (per module): headless Chromium, or a loud skip without it; `open_page`: pages in
  one desktop-sized context, any console error failing the test.
"""

from __future__ import annotations

import os
import shutil
import signal
import time

import pytest
import redis

import simulator as sim
from tests.helpers import (
    CHROMIUM_ARGS,
    TEST_SETTINGS,
    Backend,
    CallbackReceiver,
    FakeClock,
    LiveServer,
    Watched,
    chromium_path,
    create_database,
    drop_database,
    empty_postgres,
    postgres_answers,
    redis_answers,
    start_live_server,
    start_postgres,
    start_redis,
    stop_process,
)

FALLBACK_REDIS_URL = "redis://127.0.0.1:6379/15"
LOCAL_POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/postgres"


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


@pytest.fixture
def callback_receiver():
    receiver = CallbackReceiver()
    yield receiver
    receiver.stop()


@pytest.fixture
def live_server_factory(simulator):
    """Start servers with settings given as environment strings: factory(TRANSACTION_TTL="3")."""
    started: list[LiveServer] = []

    def start(**env) -> LiveServer:
        started.append(start_live_server(simulator.url, **env))
        return started[-1]

    yield start
    for live in started:
        live.stop()


@pytest.fixture
def live_server(live_server_factory) -> LiveServer:
    return live_server_factory()


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory):
    """URL of a Redis database the test session may flush at will."""
    binary = shutil.which("redis-server")
    problem = "redis-server is not installed"
    if binary:
        try:
            process, url = start_redis(binary, tmp_path_factory.mktemp("redis"))
        except RuntimeError as exc:
            problem = str(exc)
        else:
            try:
                yield url
            finally:
                stop_process(process)
            return
    if redis_answers(FALLBACK_REDIS_URL):
        redis.Redis.from_url(FALLBACK_REDIS_URL).flushdb()
        yield FALLBACK_REDIS_URL
        return
    pytest.skip(
        f"!!! REDIS TESTS NOT RUN: {problem} and nothing answers PING at "
        f"{FALLBACK_REDIS_URL}. Install redis-server (`make services`) to run them. !!!"
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


@pytest.fixture(scope="session")
def postgres_admin_url():
    """URL of a PostgreSQL database (postgres) where the session may create and drop databases."""
    if postgres_answers(LOCAL_POSTGRES_URL):
        yield LOCAL_POSTGRES_URL
        return
    try:
        process, url, folder = start_postgres()
    except RuntimeError as exc:
        message = (
            f"!!! POSTGRESQL TESTS NOT RUN: nothing answers at {LOCAL_POSTGRES_URL} and no throwaway "
            f"server could be started ({exc}). Install Debian's postgresql package to run them. !!!"
        )
        print("\n" + message)
        if os.environ.get("REQUIRE_POSTGRES") == "1":
            pytest.fail(f"{message} (REQUIRE_POSTGRES=1)")
        pytest.skip(message)
    try:
        yield url
    finally:
        process.send_signal(signal.SIGINT)  # a fast shutdown: it does not wait for clients to leave
        stop_process(process)
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_url(postgres_admin_url):
    """URL of a database made for this session, dropped at its end."""
    url = create_database(postgres_admin_url)
    try:
        yield url
    finally:
        drop_database(postgres_admin_url, url)


@pytest.fixture
def clean_postgres_url(postgres_url):
    """The session's PostgreSQL database, every table emptied for this test."""
    empty_postgres(postgres_url)
    return postgres_url


@pytest.fixture
def empty_postgres_url(postgres_admin_url):
    """A database of this test's own, with no tables yet."""
    url = create_database(postgres_admin_url)
    try:
        yield url
    finally:
        drop_database(postgres_admin_url, url)


@pytest.fixture(params=["memory", "sqlite", "redis", "postgres"])
def backend(request, tmp_path):
    """Each store backend in turn; Redis on its own time, the others on a FakeClock."""
    if request.param == "redis":
        backend = Backend("redis", request.getfixturevalue("clean_redis_url"), time.time)
    elif request.param == "postgres":
        backend = Backend("postgres", request.getfixturevalue("clean_postgres_url"), FakeClock())
    elif request.param == "sqlite":
        backend = Backend("sqlite", f"sqlite:///{tmp_path / 'store.db'}", FakeClock())
    else:
        backend = Backend("memory", "memory://", FakeClock())
    yield backend
    backend.close()


@pytest.fixture
def store(backend):
    return backend.open()


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    executable = chromium_path()
    if executable is None:
        message = (
            "!!! BROWSER TESTS SKIPPED: no chromium found (install Debian's chromium "
            "with `make services`, or set CHROMIUM to its path) !!!"
        )
        print("\n" + message)
        pytest.skip(message)
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def open_page(browser, live_server_factory):
    """Open pages in one desktop-sized browser context; any console error fails the test.

    Depends on the server factory so that the pages close before the servers stop
    (the handset would otherwise log its failed polls).
    """
    context = browser.new_context(viewport={"width": 1024, "height": 800}, locale="en-KE")
    watched: list[Watched] = []

    def open_page(allow: tuple[str, ...] = ()):
        page = Watched(context.new_page(), allow)
        watched.append(page)
        return page.page

    yield open_page
    context.close()
    problems = [p for page in watched for p in page.problems]
    assert not problems, f"browser console errors: {problems}"
