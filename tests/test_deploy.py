"""The one-click deploy files: app.json (Heroku), Dockerfile, .dockerignore and compose.yaml.

No Docker daemon is needed. The files are checked against what the server reads (config.py,
parsed with ast) and against the Procfile; then the image's command is run as a subprocess from a
copy of the build context, with the image's environment, and the Procfile's command through bash
(as Heroku runs it) with app.json's values, to prove that both serve /health in simulator mode.
"""

from __future__ import annotations

import ast
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from config import ConfigError, load_settings
from tests.helpers import PAID, ROOT, ServerProcess, free_port, wait_until

SETTING_READERS = {"_get", "_int", "_float", "_bool", "_directory", "_secret", "_rate_limit"}
# Read (or, for REDIS_URL, possibly read) by the server but set by Heroku, never by app.json.
PLATFORM_SET = {"PORT": "Heroku sets it on every web dyno", "REDIS_URL": "the heroku-redis add-on sets and rotates it"}
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


def test_app_json_is_a_heroku_manifest_for_one_web_dyno():
    manifest = app_json()
    assert 3 <= len(manifest["name"]) <= 30 and len(manifest["description"]) <= 140
    assert manifest["buildpacks"] == [{"url": "heroku/python"}]
    # memory:// (the default store) lives in one process of one dyno.
    assert manifest["formation"]["web"]["quantity"] == 1
    assert manifest["env"]["WEB_CONCURRENCY"]["value"] == "1"
    plans = [addon["plan"] if isinstance(addon, dict) else addon for addon in manifest["addons"]]
    assert any(plan.startswith("heroku-redis:") for plan in plans)
    store = manifest["env"]["STORE_URL"]
    assert "value" not in store, "a STORE_URL value would pin every deploy to it"
    assert "REDIS_URL" in store["description"] and "ssl_cert_reqs=none" in store["description"]


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


@pytest.mark.parametrize("blank_as_unset", [False, True], ids=["blank-as-empty", "blank-as-unset"])
def test_app_json_defaults_give_the_simulator_demo(blank_as_unset):
    settings = load_settings({**heroku_env(blank_as_unset), "DYNO": "web.1", "PORT": "5000"})
    assert settings.mpesa_env == "simulator"
    assert settings.store_kind == "memory"
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
    assert "PORT" in docker_env(), "gunicorn.conf.py binds $PORT; the image says its default"
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
    needed |= {"requirements.txt", "gunicorn.conf.py"}
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


# The commands themselves.


def base_env(home: Path) -> dict[str, str]:
    """A bare environment whose PATH finds this interpreter's gunicorn, as the image's would."""
    return {
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), "/usr/local/bin", "/usr/bin", "/bin"]),
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

    def wait_until_serving(self, seconds: float = 20) -> str | None:
        """None once it answers; otherwise why not, with the end of its log."""
        deadline = time.monotonic() + seconds
        while self.process.poll() is None and time.monotonic() < deadline:
            try:
                requests.get(self.url + "/health", timeout=2)
                return None
            except (requests.ConnectionError, requests.Timeout):  # not bound yet, or still booting
                time.sleep(0.1)
        return f"{shlex.join(self.command)} did not answer on port {self.port}:\n{self.log.read_text()[-3000:]}"

    def stop(self) -> None:
        """SIGTERM to gunicorn's master, as `docker stop` sends; then end what is left of its group."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.process.pid, signal.SIGKILL)  # workers or the simulator, if any remain
        except ProcessLookupError:
            pass
        self.process.wait()


def image_server(tmp: Path) -> Server:
    """The container's CMD, from a copy of the build context, with the image's ENV, and a PORT
    and a metrics directory of its own (a container has the machine to itself; tests do not)."""
    app = tmp / "app"  # WORKDIR /app after COPY . .
    for rel in build_context():
        (app / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, app / rel, follow_symlinks=False)
    port = free_port()
    env = {**base_env(tmp), **docker_env(), "PORT": str(port), "PROMETHEUS_MULTIPROC_DIR": str(tmp / "metrics")}
    return Server(exec_form("CMD"), env, app, tmp / "image.log", port)


def heroku_server(tmp: Path) -> Server:
    """The Procfile's command run by bash, as Heroku runs it, with app.json's config vars, Heroku's
    PORT and DYNO, and the Python buildpack's WEB_CONCURRENCY (2 on a basic dyno unless app.json
    sets it); TMPDIR keeps what the command makes in the test's folder."""
    port = free_port()
    env = {**base_env(tmp), **heroku_env(), "PORT": str(port), "DYNO": "web.1", "TMPDIR": str(tmp)}
    env.setdefault("WEB_CONCURRENCY", "2")
    web = re.search(r"^web:\s*(.+)$", (ROOT / "Procfile").read_text(), re.M).group(1)
    return Server(["bash", "-c", web], env, ROOT, tmp / "heroku.log", port)


@pytest.fixture(scope="module")
def deployed(tmp_path_factory):
    """Both deploys, booted side by side (each takes a few seconds)."""
    servers = {
        "image": image_server(tmp_path_factory.mktemp("image")),
        "heroku": heroku_server(tmp_path_factory.mktemp("heroku")),
    }
    try:
        for server in servers.values():
            server.start()
        failures = {name: server.wait_until_serving() for name, server in servers.items()}
        yield servers, failures
    finally:
        for server in servers.values():
            server.stop()


def serving(deployed, name: str) -> Server:
    servers, failures = deployed
    if failures[name]:
        pytest.fail(failures[name], pytrace=False)
    return servers[name]


def test_image_command_serves_health_in_simulator_mode(deployed):
    server = serving(deployed, "image")
    assert "MPESA_ENV" not in server.env
    health = requests.get(server.url + "/health", timeout=5)
    assert health.status_code == 200, health.text
    assert health.json()["mode"] == "simulator" and health.json()["store"] == "memory"
    page = requests.get(server.url + "/", timeout=5)
    assert page.status_code == 200  # templates/ made it into the context
    asset = re.search(r"""(?:src|href)=["'](/static/[^"']+)""", page.text).group(1)
    assert requests.get(server.url + asset, timeout=5).status_code == 200  # and static/


def test_image_healthcheck_tells_a_serving_container_from_a_stopped_one(deployed):
    server = serving(deployed, "image")
    check = subprocess.run(exec_form("HEALTHCHECK"), env=server.env, cwd=server.cwd, capture_output=True, timeout=10)
    assert check.returncode == 0, check.stderr
    server.stop()
    check = subprocess.run(exec_form("HEALTHCHECK"), env=server.env, cwd=server.cwd, capture_output=True, timeout=10)
    assert check.returncode == 1  # what Docker counts as unhealthy


def test_heroku_deploy_without_credentials_serves_the_demo(deployed):
    health = requests.get(serving(deployed, "heroku").url + "/health", timeout=5)
    assert health.status_code == 200, health.text
    assert health.json()["mode"] == "simulator"


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
    command = [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "server:app"]
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
