"""config.py: the one reader of the environment, and the settings it checks at start-up."""

from __future__ import annotations

import ast
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

from config import HEROKU_WORKERS, ConfigError, choose_store, load_settings
from tests.helpers import PROCFILE_COMMAND

ROOT = Path(__file__).resolve().parent.parent
LONG = "sixteen-letters!"  # the shortest secret taken
ENVIRONMENT_FUNCTIONS = {"getenv", "getenvb", "putenv", "unsetenv"}


def environment_reads(path: Path) -> list[str]:
    """Where a module touches the process environment: os.environ, os.getenv and the like."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Attribute) and node.attr in {"environ", "environb"} | ENVIRONMENT_FUNCTIONS:
            if isinstance(node.value, ast.Name) and node.value.id == "os":
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} os.{node.attr}")
        elif isinstance(node, ast.ImportFrom) and node.module == "os":
            for alias in node.names:
                if alias.name in {"environ", "environb"} | ENVIRONMENT_FUNCTIONS:
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno} from os import {alias.name}")
    return found


def project_modules() -> list[Path]:
    """Every Python file of the server: all but the tests, the benchmarks and installed packages."""
    skipped = {"tests", "bench", "examples", "node_modules", "__pycache__"}
    return [
        path
        for path in ROOT.rglob("*.py")
        if not skipped & set(path.relative_to(ROOT).parts) and not path.relative_to(ROOT).parts[0].startswith(".")
    ]


def test_config_is_the_only_module_that_reads_the_environment():
    modules = project_modules()
    assert ROOT / "config.py" in modules and ROOT / "serve.py" in modules
    assert environment_reads(ROOT / "config.py"), "the scan finds config.py's reads"
    elsewhere = [read for path in modules if path.name != "config.py" for read in environment_reads(path)]
    assert not elsewhere, elsewhere


@pytest.mark.parametrize(
    "environ, setting",
    [
        ({"LOG_FORMAT": "yaml"}, "LOG_FORMAT"),
        ({"WEB_CONCURRENCY": "2"}, "WEB_CONCURRENCY"),  # memory:// by default
        ({"STORE_URL": "memory://", "WEB_CONCURRENCY": "3"}, "WEB_CONCURRENCY"),
        ({"STORE_URL": "sqlite:///x.db", "WEB_CONCURRENCY": "0"}, "WEB_CONCURRENCY"),
        ({"WEB_THREADS": "0"}, "WEB_THREADS"),
        ({"WEB_THREADS": "eight"}, "WEB_THREADS"),
        ({"GUNICORN_THREADS": "eight"}, "GUNICORN_THREADS"),
        ({"PROMETHEUS_MULTIPROC_DIR": ""}, "PROMETHEUS_MULTIPROC_DIR"),
        ({"PROMETHEUS_MULTIPROC_DIR": "  "}, "PROMETHEUS_MULTIPROC_DIR"),
        ({"SIMULATOR_PORT": "70000"}, "SIMULATOR_PORT"),
        ({"SIMULATOR_PORT": "3001", "PORT": "3001"}, "SIMULATOR_PORT"),
        ({"SIMULATOR_PORT": "3002", "MPESA_BASE_URL": "http://127.0.0.1:9"}, "SIMULATOR_PORT"),
        ({"STORE_URL": "sqlite:///x.db", "WEB_CONCURRENCY": "3", "PORT": "0"}, "SIMULATOR_PORT"),
        ({"ADMIN_LOGIN_FREE_TRIES": "-1"}, "ADMIN_LOGIN_FREE_TRIES"),
        ({"ADMIN_LOGIN_DELAY": "0"}, "ADMIN_LOGIN_DELAY"),
        ({"ADMIN_LOGIN_MAX_DELAY": "soon"}, "ADMIN_LOGIN_MAX_DELAY"),
        ({"STORE_URL": "ftp://example.com/payments"}, "STORE_URL"),
        ({"STORE_URL": "sqlite:///:memory:"}, "STORE_URL"),
        ({"STORE_URL": "sqlite:////no/such/dir/payments.db"}, "STORE_URL"),
        ({"DATABASE_URL": "mysql://shop:pw@db.example.com/shop"}, "DATABASE_URL"),
        ({"REDIS_URL": "http://cache.example.com"}, "REDIS_URL"),
        ({"UPKEEP_SECONDS": "-1"}, "UPKEEP_SECONDS"),
        ({"UPKEEP_SECONDS": "every minute"}, "UPKEEP_SECONDS"),
        ({"UPKEEP_SECONDS": "inf"}, "UPKEEP_SECONDS"),
        ({"UPKEEP_SECONDS": "0.01"}, "UPKEEP_SECONDS"),
        ({"ADMIN_TOKEN": "a"}, "ADMIN_TOKEN"),
        ({"ADMIN_TOKEN": "fifteen-letters"}, "ADMIN_TOKEN"),
        ({"CALLBACK_TOKEN": "short-token"}, "CALLBACK_TOKEN"),
        ({"CALLBACK_TOKEN": "a-long-token-with/a-slash"}, "CALLBACK_TOKEN"),
        ({"SECRET_KEY": "0123456789"}, "SECRET_KEY"),
        ({"CHECKOUT_SECRET": "shop"}, "CHECKOUT_SECRET"),
        ({"MERCHANT_WEBHOOK_URL": "https://shop.example/events", "WEBHOOK_SECRET": "shop-secret"}, "WEBHOOK_SECRET"),
        ({"MERCHANT_WEBHOOK_URL": "https://shop.example/events", "WEBHOOK_SECRET": f"{LONG},old"}, "WEBHOOK_SECRET"),
        ({"MERCHANT_WEBHOOK_URL": "https://shop.example/events", "WEBHOOK_SECRET": " , "}, "WEBHOOK_SECRET"),
    ],
)
def test_a_bad_setting_is_refused_with_one_line_naming_it(environ, setting):
    with pytest.raises(ConfigError) as refused:
        load_settings(environ)
    message = str(refused.value)
    assert setting in message and "\n" not in message


def test_a_metrics_directory_is_made_when_missing(tmp_path):
    wanted = tmp_path / "metrics" / "server"
    assert load_settings({"PROMETHEUS_MULTIPROC_DIR": str(wanted)}).metrics_dir == str(wanted)
    assert wanted.is_dir()


def test_a_metrics_directory_that_cannot_be_made_is_refused(tmp_path):
    (tmp_path / "a-file").write_text("")
    with pytest.raises(ConfigError, match=r"^PROMETHEUS_MULTIPROC_DIR: cannot make the directory"):
        load_settings({"PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "a-file" / "metrics")})


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_an_unwritable_metrics_directory_is_refused(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    try:
        with pytest.raises(ConfigError, match=r"^PROMETHEUS_MULTIPROC_DIR: .* is not writable"):
            load_settings({"PROMETHEUS_MULTIPROC_DIR": str(locked)})
    finally:
        locked.chmod(0o700)


def test_without_a_metrics_directory_each_process_counts_alone():
    assert load_settings({}).metrics_dir is None


@pytest.mark.parametrize("terminal, expected", [(True, "text"), (False, "json")])
def test_the_log_format_is_text_on_a_terminal_and_json_otherwise(monkeypatch, terminal, expected):
    class Stdout(io.StringIO):
        def isatty(self) -> bool:
            return terminal

    monkeypatch.setattr(sys, "stdout", Stdout())
    assert load_settings({}).log_format == expected
    assert load_settings({"LOG_FORMAT": ""}).log_format == expected  # blank is unset
    assert load_settings({"LOG_FORMAT": "TEXT"}).log_format == "text"
    assert load_settings({"LOG_FORMAT": "json"}).log_format == "json"


def test_workers_default_to_one_for_memory_and_two_per_core_and_one_otherwise():
    assert load_settings({}).workers == 1
    assert load_settings({"WEB_CONCURRENCY": "1"}).workers == 1
    shared = {"STORE_URL": "sqlite:///x.db", "MPESA_BASE_URL": "http://127.0.0.1:9"}
    assert load_settings(shared).workers == (os.cpu_count() or 1) * 2 + 1
    assert load_settings({**shared, "WEB_CONCURRENCY": "4", "GUNICORN_THREADS": "2"}).workers == 4
    assert load_settings({**shared, "WEB_THREADS": "2"}).threads == 2
    assert load_settings({**shared, "GUNICORN_THREADS": "3"}).threads == 3  # its earlier name
    assert load_settings({}).threads == 8


def test_on_a_heroku_dyno_workers_default_to_the_buildpacks_two_not_the_hosts_cpu_count():
    # A 512 MB dyno reports the host's 8 CPUs; Heroku's Python buildpack would set 2 (Fir dynos: nothing).
    dyno = {"DYNO": "web.1", "STORE_URL": "sqlite:///x.db", "MPESA_BASE_URL": "http://127.0.0.1:9"}
    assert HEROKU_WORKERS == 2
    assert load_settings(dyno).workers == HEROKU_WORKERS
    assert load_settings({**dyno, "WEB_CONCURRENCY": "5"}).workers == 5  # the buildpack's or the operator's value
    assert load_settings({"DYNO": "web.1"}).workers == 1  # memory:// is one process anywhere


REDIS = "redis://127.0.0.1:6379/0"
HEROKU_REDIS = "rediss://:secret-password@ec2-1-2-3-4.compute-1.amazonaws.com:12345"
HEROKU_POSTGRES = "postgres://user:secret-password@ec2-5-6-7-8.compute-1.amazonaws.com:5432/d1"


def test_without_store_url_the_store_follows_the_add_ons_database_first():
    assert choose_store({}) == ("memory://", "default")
    assert choose_store({"DATABASE_URL": HEROKU_POSTGRES}) == (HEROKU_POSTGRES, "DATABASE_URL")
    postgresql = HEROKU_POSTGRES.replace("postgres://", "postgresql://")
    assert choose_store({"DATABASE_URL": postgresql}) == (postgresql, "DATABASE_URL")
    assert choose_store({"DATABASE_URL": HEROKU_POSTGRES, "REDIS_URL": REDIS}) == (HEROKU_POSTGRES, "DATABASE_URL")
    assert choose_store({"REDIS_URL": REDIS}) == (REDIS, "REDIS_URL")
    assert choose_store({"STORE_URL": "sqlite:///x.db", "DATABASE_URL": HEROKU_POSTGRES, "REDIS_URL": REDIS}) == (
        "sqlite:///x.db",
        "STORE_URL",
    )
    assert choose_store({"STORE_URL": "", "REDIS_URL": REDIS}) == (REDIS, "REDIS_URL")  # blank is unset


def test_redis_from_redis_url_is_the_store_and_holds_the_rate_limits_and_the_token():
    settings = load_settings({"REDIS_URL": REDIS})
    assert (settings.store_kind, settings.store_origin, settings.redis_url) == ("redis", "REDIS_URL", REDIS)
    assert settings.limits_kind == "redis"
    explicit = load_settings({"STORE_URL": "sqlite:///x.db", "REDIS_URL": REDIS})
    assert (explicit.store_kind, explicit.store_origin, explicit.redis_url) == ("sqlite", "STORE_URL", REDIS)
    own = load_settings({"STORE_URL": "redis://127.0.0.1:6379/3", "REDIS_URL": REDIS})
    assert own.redis_url == "redis://127.0.0.1:6379/3", "the store's Redis, when the store is Redis"
    alone = load_settings({"STORE_URL": "sqlite:///x.db"})
    assert alone.redis_url is None and alone.limits_kind == "sqlite", "without Redis: in the store"


def test_a_heroku_rediss_url_skips_the_certificate_check_of_its_self_signed_certificate():
    settings = load_settings({"REDIS_URL": HEROKU_REDIS})
    assert settings.store_url == settings.redis_url == HEROKU_REDIS + "?ssl_cert_reqs=none"
    with_query = load_settings({"REDIS_URL": HEROKU_REDIS + "/0?health_check_interval=10"}).redis_url
    assert with_query == HEROKU_REDIS + "/0?health_check_interval=10&ssl_cert_reqs=none"
    checked = HEROKU_REDIS + "?ssl_cert_reqs=required"  # a REDIS_URL that says how is taken as it is
    assert load_settings({"REDIS_URL": checked}).redis_url == checked
    limits_only = load_settings({"STORE_URL": "sqlite:///x.db", "REDIS_URL": HEROKU_REDIS}).redis_url
    assert limits_only == HEROKU_REDIS + "?ssl_cert_reqs=none"
    # Only REDIS_URL, Heroku's setting: a rediss:// STORE_URL is the operator's and is checked.
    assert load_settings({"STORE_URL": HEROKU_REDIS}).store_url == HEROKU_REDIS
    assert load_settings({"REDIS_URL": REDIS}).redis_url == REDIS  # no TLS, nothing to skip


def test_a_refused_add_on_url_is_named_without_its_password():
    for name, url in (
        ("DATABASE_URL", "mysql://shop:secret-password@db/shop"),
        ("REDIS_URL", "http://:secret-password@c"),
    ):
        with pytest.raises(ConfigError) as refused:
            load_settings({name: url})
        assert str(refused.value).startswith(name) and "secret-password" not in str(refused.value)


def test_several_workers_share_one_simulator_and_one_runs_its_own():
    alone = load_settings({"PORT": "4000"})
    assert alone.simulator_port is None and alone.base_url is None  # the process starts its own
    several = load_settings({"PORT": "4000", "STORE_URL": "sqlite:///x.db", "WEB_CONCURRENCY": "3"})
    assert several.simulator_port == 4001 and several.base_url == "http://127.0.0.1:4001"
    chosen = load_settings({"PORT": "4000", "SIMULATOR_PORT": "5000"})
    assert chosen.simulator_port == 5000 and chosen.base_url == "http://127.0.0.1:5000"
    elsewhere = load_settings({"STORE_URL": "sqlite:///x.db", "WEB_CONCURRENCY": "3", "MPESA_BASE_URL": "http://d:9"})
    assert elsewhere.simulator_port is None and elsewhere.base_url == "http://d:9"


def test_the_simulator_port_means_nothing_outside_simulator_mode():
    sandbox = {
        "MPESA_ENV": "sandbox",
        "MPESA_CONSUMER_KEY": "key",
        "MPESA_CONSUMER_SECRET": "secret",
        "CALLBACK_URL": "https://shop.example.com",
        "CALLBACK_TOKEN": "callback-token-0123456789",
        "SIMULATOR_PORT": "5000",
    }
    settings = load_settings(sandbox)
    assert settings.simulator_port is None and settings.base_url is None


def test_secrets_of_sixteen_characters_are_taken_and_safaricom_credentials_as_they_come():
    settings = load_settings(
        {
            "MPESA_ENV": "sandbox",
            "MPESA_CONSUMER_KEY": "k",
            "MPESA_CONSUMER_SECRET": "s",
            "MPESA_PASSKEY": "p",
            "CALLBACK_URL": "https://shop.example.com",
            "CALLBACK_TOKEN": "callback_token-0",
            "ADMIN_TOKEN": LONG,
            "SECRET_KEY": LONG,
            "CHECKOUT_SECRET": LONG,
            "MERCHANT_WEBHOOK_URL": "https://shop.example/events",
            "WEBHOOK_SECRET": f"{LONG}, {LONG.upper()}",
        }
    )
    assert (settings.consumer_key, settings.consumer_secret, settings.passkey) == ("k", "s", "p")
    assert settings.admin_token == settings.secret_key == settings.checkout_secret == LONG
    assert settings.callback_token == "callback_token-0"
    assert settings.webhook_secrets == (LONG, LONG.upper())  # each signs every event while the shop switches


def test_admin_sign_in_limits_are_settings():
    defaults = load_settings({})
    assert (defaults.admin_login_free_tries, defaults.admin_login_delay, defaults.admin_login_max_delay) == (3, 1, 300)
    given = load_settings({"ADMIN_LOGIN_FREE_TRIES": "0", "ADMIN_LOGIN_DELAY": "0.5", "ADMIN_LOGIN_MAX_DELAY": "10"})
    assert (given.admin_login_free_tries, given.admin_login_delay, given.admin_login_max_delay) == (0, 0.5, 10)


def test_upkeep_rounds_come_every_15_seconds_unless_set_or_turned_off():
    assert load_settings({}).upkeep_seconds == 15
    assert load_settings({"UPKEEP_SECONDS": "2.5"}).upkeep_seconds == 2.5
    assert load_settings({"UPKEEP_SECONDS": "0"}).upkeep_seconds == 0


@pytest.mark.parametrize(
    "command, environ, setting",
    [
        ([sys.executable, "server.py"], {"LOG_FORMAT": "xml"}, "LOG_FORMAT"),
        ([sys.executable, "server.py"], {"STORE_URL": "sqlite:////no/such/dir/payments.db"}, "STORE_URL"),
        (
            PROCFILE_COMMAND,
            {"STORE_URL": "sqlite:///:memory:"},
            "STORE_URL",
        ),
        (
            PROCFILE_COMMAND,
            {"WEB_CONCURRENCY": "2", "STORE_URL": "memory://"},
            "WEB_CONCURRENCY",
        ),
        (
            PROCFILE_COMMAND,
            {"PROMETHEUS_MULTIPROC_DIR": "/proc/no-metrics-here"},
            "PROMETHEUS_MULTIPROC_DIR",
        ),
        (
            PROCFILE_COMMAND,
            {"ADMIN_TOKEN": "a"},
            "ADMIN_TOKEN",
        ),
    ],
    ids=[
        "server.py-log-format",
        "server.py-sqlite-folder",
        "procfile-sqlite-memory",
        "procfile-memory-workers",
        "procfile-metrics-directory",
        "procfile-admin-token",
    ],
)
def test_a_bad_setting_stops_start_up_with_one_line(command, environ, setting):
    env = {"PATH": os.environ["PATH"], "LANG": "C.UTF-8", "PORT": "0", "PYTHONUNBUFFERED": "1", **environ}
    out = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode != 0
    lines = (out.stdout + out.stderr).strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Configuration error: ") and setting in lines[0], lines
