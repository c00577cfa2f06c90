"""Where the time goes: py-spy samples the server's worker during status polls and pushes.

py-spy (from .bench-venv/, never the project's venv) attaches to the one worker of a
memory-store server without pausing it (--nonblocking) while wrk (or the Python generator)
polls a completed payment, then while 50 threads push. Only the thread holding the GIL is
sampled (--gil), so the shares are of the worker's Python CPU time, not of threads waiting.
The tables give each function's share of the samples with it on the stack (inclusive) or at
the top (self); the findings turn the large shares into proposed changes. A micro-benchmark
then times each piece of a status poll in-process, beside the whole poll and the bare app.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections import Counter
from functools import partial
from pathlib import Path

from bench.bench_memory import record
from bench.harness import (
    ROOT,
    BenchError,
    Context,
    bench_venv_python,
    completed_payment,
    free_port,
    load,
    post_batch,
    server_env,
    server_workers,
    start_redis,
    start_server,
    start_simulator,
    table,
)
from config import load_settings

FRAME = re.compile(r"^(?P<function>.+) \((?P<file>[^:()]+)(?::\d+)?\)$")
CONCERNS = [  # label, test on a frame's (file, function); none of them wraps the view
    (
        "logging (log lines, each request's own included)",
        lambda f, fn: f.startswith("logging/"),
    ),
    ("JSON encode/decode", lambda f, fn: f.startswith(("json/", "flask/json"))),
    ("store.py (reads, writes, encoding)", lambda f, fn: f.startswith("store/")),
    ("copy.deepcopy", lambda f, fn: f == "copy.py"),
    ("dataclasses.asdict", lambda f, fn: f == "dataclasses.py" and "asdict" in fn),
    (
        "Flask-Limiter request check (limits off)",
        lambda f, fn: f.startswith("flask_limiter/") and ("check_request_limit" in fn or "evaluate_limits" in fn),
    ),
    ("Flask-CORS after_request", lambda f, fn: f.startswith("flask_cors/") and "after_request" in fn),
    (
        "request metrics (metrics.py, prometheus_client)",
        lambda f, fn: f.startswith("prometheus_client/") or (f == "telemetry/metrics.py" and fn == "request_served"),
    ),
    ("outgoing HTTP to Daraja (requests, urllib3)", lambda f, fn: f.startswith(("requests/", "urllib3/"))),
    (
        "requests reading proxy settings from the environment",
        lambda f, fn: f.startswith("requests/") and ("merge_environment_settings" in fn or "get_environ_proxies" in fn),
    ),
]


def run(ctx: Context) -> str:
    python = bench_venv_python(ctx)
    py_spy = python.parent / "py-spy"
    if not py_spy.exists():
        raise BenchError("py-spy is not in .bench-venv (bench/peers-requirements.txt)")
    seconds = 3.0 if ctx.quick else 6.0
    own_files = _own_files()

    sim = start_simulator(ctx)
    server = start_server(ctx, server_env(sim.url, "memory://", free_port()), name="server-profiled")
    workers = server_workers(server)
    if len(workers) != 1:
        raise BenchError(f"expected one worker for the memory store, found {workers}")
    checkout_id = completed_payment(server.url)
    scratch = ctx.scratch("profile")

    ctx.log("profile: status polls under py-spy")
    poll_stacks = _record(
        py_spy,
        workers[0],
        seconds,
        scratch / "poll.txt",
        lambda: load(server.url + "/stkpush/status", {"checkoutRequestId": checkout_id}, seconds - 1, 32, scratch),
    )
    ctx.log("profile: pushes under py-spy")
    pushes = 300 if ctx.quick else 1000
    jobs = [(server.url + "/stkpush", {"phone": f"25472{i:07d}", "amount": 10}, {}) for i in range(pushes)]
    push_stacks = _record(
        py_spy, workers[0], seconds, scratch / "push.txt", lambda: post_batch(jobs, 50, deadline_seconds=seconds * 3)
    )

    micro = _micro(ctx)
    sections, shares = [], {}
    for title, stacks in (
        ("Status poll (`POST /stkpush/status`, completed payment)", poll_stacks),
        ("Push (`POST /stkpush`)", push_stacks),
    ):
        text, shares[title.split(" (")[0]] = _report(stacks, own_files)
        sections += ["", f"### {title}", "", text]
    lines = [
        "## 6. Profiles of the hot paths",
        "",
        f"py-spy {_version(py_spy)} sampling the single worker of a memory-store server "
        "(`--nonblocking --gil`, 250 Hz: only the thread holding the GIL, so the worker's Python "
        f"CPU time) during {seconds:.0f} s of status polls (32 connections) and during {pushes:,} "
        "pushes from 50 threads. Share = samples with the function on the stack (inclusive) or on "
        "top (self), over those samples.",
        "",
        "### Findings",
        "",
        _findings(shares),
        *sections,
        "",
        "### What each piece of a status poll costs",
        "",
        micro,
    ]
    return "\n".join(lines)


def _record(py_spy: Path, pid: int, seconds: float, output: Path, work) -> Counter:
    """Run work() while py-spy records pid; return the collapsed stacks."""
    command = [
        str(py_spy),
        "record",
        "--pid",
        str(pid),
        "--duration",
        str(int(seconds)),
        "--rate",
        "250",
        "--nonblocking",
        "--gil",
        "--format",
        "raw",
        "--output",
        str(output),
    ]
    spy = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        time.sleep(0.5)
        work()
        out = spy.communicate(timeout=seconds + 30)[0].decode(errors="replace")
    finally:
        if spy.poll() is None:
            spy.kill()
            spy.wait()
    if spy.returncode != 0 or not output.exists():
        raise BenchError(f"py-spy failed ({spy.returncode}): {out[-600:]}")
    stacks: Counter = Counter()
    for line in output.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            stacks[stack] += int(count)
    return stacks


def _frames(stack: str) -> list[tuple[str, str]]:
    frames = []
    for text in stack.split(";"):
        match = FRAME.match(text.strip())
        if match:
            frames.append((match["file"], match["function"]))
    return frames


def _report(stacks: Counter, own_files: set[str]) -> tuple[str, dict]:
    """The tables for one path, and each concern's share of its samples."""
    # Only request-handling stacks (uWSGI calls the app from C): not the upkeep's or the webhook sender's threads.
    stacks = Counter({stack: n for stack, n in stacks.items() if stack.startswith("Flask.__call__ ")})
    total = sum(stacks.values())
    if not total:
        return "No samples (the load did not reach the worker?).", {}
    self_time: Counter = Counter()
    inclusive: Counter = Counter()
    concerns: Counter = Counter()
    components: Counter = Counter()
    for stack, count in stacks.items():
        frames = _frames(stack)
        if not frames:
            continue
        leaf_file, leaf_function = frames[-1]
        self_time[f"`{leaf_function}` ({leaf_file})"] += count
        components[_component(leaf_file, own_files)] += count
        for label in {f"`{function}` ({file})" for file, function in frames if file in own_files}:
            inclusive[label] += count
        for name, test in CONCERNS:
            if any(test(file, function) for file, function in frames):
                concerns[name] += count

    def share(n):
        return f"{100 * n / total:.0f}%"

    parts = [
        f"{total:,} samples of request handling holding the GIL.",
        "",
        "**Self time by component** (where the interpreter actually was):",
        "",
        table(["component", "share"], [[name, share(n)] for name, n in components.most_common(10)]),
        "",
        "**Inclusive, by concern** (a sample may count under several):",
        "",
        table(["concern", "share"], [[name, share(n)] for name, n in concerns.most_common()]),
        "",
        "**Our code, inclusive:**",
        "",
        table(["function", "share"], [[label, share(n)] for label, n in inclusive.most_common(10)]),
        "",
        "**Hottest functions, self:**",
        "",
        table(["function", "share"], [[label, share(n)] for label, n in self_time.most_common(8)]),
    ]
    return "\n".join(parts), {name: n / total for name, n in concerns.items()}


def _own_files() -> set[str]:
    """The server's modules as py-spy names them: `server.py`, `store/memory.py`, ..."""
    outside = {".venv", ".bench-venv", "bench", "tests", "examples", "node_modules"}
    paths = (path.relative_to(ROOT) for path in ROOT.glob("**/*.py"))
    return {str(path) for path in paths if path.parts[0] not in outside}


def _component(file: str, own_files: set[str]) -> str:
    """`store.py` for our files, else the package or stdlib module a frame's file belongs to."""
    if file in own_files:
        return f"our `{file}`"
    if file.startswith("<frozen "):
        file = file[len("<frozen ") :].rstrip(">")
    return file.split("/")[0].removesuffix(".py")


def _version(py_spy: Path) -> str:
    try:
        return subprocess.run([str(py_spy), "--version"], capture_output=True, text=True, timeout=10).stdout.split()[-1]
    except (OSError, subprocess.SubprocessError, IndexError):
        return "?"


def _micro(ctx: Context) -> str:
    """What each piece of a status poll costs, in this process (no HTTP server, no threads)."""
    import io
    import logging
    import os
    import timeit

    import api
    import bench.bare_app as bare
    import server
    from telemetry import logs, metrics

    repeat = 1000 if ctx.quick else 3000
    logs.configure_logging("json")
    sink = open(os.devnull, "w")
    for handler in logging.getLogger().handlers:
        handler.setStream(sink)
        handler.setFormatter(logs.JsonFormatter())
    scratch = ctx.scratch("profile-micro")
    redis_url, _ = start_redis(ctx)
    sim = start_simulator(ctx)
    stores = [("memory", "memory://"), ("SQLite", f"sqlite:///{scratch / 'payments.db'}")]
    stores += [("Redis", redis_url)] if redis_url else []
    completed = record(1, time.time())
    apps = {}
    for name, url in stores:
        settings = load_settings({**server_env(sim.url, url, free_port()), "LOG_FORMAT": "json"})
        app = server.create_app(settings)
        app.extensions["store"].create(completed)
        apps[name] = app
    body = json.dumps({"checkoutRequestId": completed.checkout_request_id}).encode()

    def best(function) -> float:
        return min(timeit.repeat(function, number=repeat, repeat=5)) / repeat * 1e6

    def poll(app):
        environ = {
            "REQUEST_METHOD": "POST",
            "PATH_INFO": "/stkpush/status",
            "SERVER_NAME": "bench",
            "SERVER_PORT": "80",
            "wsgi.url_scheme": "http",
            "CONTENT_TYPE": "application/json",
            "CONTENT_LENGTH": str(len(body)),
            "REMOTE_ADDR": "127.0.0.1",
        }

        def call():
            answer = app({**environ, "wsgi.input": io.BytesIO(body)}, lambda status, headers, exc_info=None: None)
            b"".join(answer)
            getattr(answer, "close", lambda: None)()

        return call

    memory = apps["memory"]
    request_log = logging.getLogger("server")
    with memory.test_request_context("/stkpush/status", method="POST", data=body, content_type="application/json"):
        tx = memory.extensions["store"].get(completed.checkout_request_id)
        pieces = [
            (
                "the request's JSON log line through logging (as `RequestLog` logs it, formatted and "
                "written at once, to /dev/null)",
                best(
                    lambda: request_log.info(
                        "%s %s %s %.1fms",
                        "POST",
                        "/stkpush/status",
                        200,
                        1.2,
                        extra={
                            "request_id": "0123456789abcdef0123456789abcdef",
                            "method": "POST",
                            "path": "/stkpush/status",
                            "status": 200,
                            "duration_ms": 1.2,
                            "remote_addr": "127.0.0.1",
                        },
                    )
                ),
            ),
            (
                "its request metrics (`metrics.request_served`)",
                best(lambda: metrics.request_served("POST", "/stkpush/status", 200, 0.001)),
            ),
            ("reading the body (`read_json`)", best(api.read_json)),
            (
                "building and encoding the answer (`status_answer` + `jsonify`; first poll after settling only)",
                best(lambda: api.jsonify(api.status_answer(tx))),
            ),
        ]
    for app in apps.values():
        store_ = app.extensions["store"]
        pieces.append(
            (
                f"reading the record (`{type(store_).__name__}.get`; the first poll after "
                "it settled only, later ones get the kept answer)",
                best(partial(store_.get, completed.checkout_request_id)),
            )
        )
    whole = [("the bare app (bench/bare_app.py)", best(poll(bare.app)))]
    whole += [(f"the server, {name} store", best(poll(app))) for name, app in apps.items()]
    for app in apps.values():
        app.extensions["store"].close()
    rows = [[name, f"{micros:.1f} µs"] for name, micros in whole + pieces]
    return "\n".join(
        [
            f"Best of 5 × {repeat:,} calls each, in this process: one completed payment polled through "
            "the WSGI app with no HTTP server in front (so without uWSGI's own cost per request, "
            "which both apps pay alike), then the pieces of a poll one by one. Rate limits off, "
            "as in section 1.",
            "",
            table(["what", "time per call"], rows),
            "",
            "A ratio of 0.9 in section 1 leaves the server about 11% more CPU per request than the bare "
            "app *including* uWSGI's share.",
        ]
    )


# What to change when a concern takes a material share of a path (shown from 3%).
PROPOSALS = {
    "logging (log lines, each request's own included)": (
        "every line is made, formatted and written on the thread answering the request "
        "(the request's own line, a push's `payment … started`, Daraja calls); fewer lines "
        "per request, or fewer fields per line, would make it cheaper"
    ),
    "request metrics (metrics.py, prometheus_client)": (
        "with several workers each observation writes prometheus-client's multiprocess files; "
        "fewer histogram buckets or labels would make it cheaper"
    ),
    "store.py (reads, writes, encoding)": (
        "the record is decoded whole from JSON on every read (callbacks, polls of pending "
        "payments); most need a few fields"
    ),
    "Flask-Limiter request check (limits off)": (
        "Flask-Limiter is created although limits are off: check `NoRateLimits` in server.py"
    ),
    "Flask-CORS after_request": (
        "Flask-CORS (installed only when FRONTEND_URL is set) matches every request against its "
        "resources; requests without an Origin header could skip it"
    ),
    "requests reading proxy settings from the environment": (
        "requests is reading the environment per call again: check `mpesa.pooled_session`"
    ),
}


def _findings(shares: dict) -> str:
    """The proposals whose concern takes at least 3% of a path's Python CPU time."""
    items = []
    for concern, proposal in PROPOSALS.items():
        seen = [
            f"{share * 100:.0f}% of {path.lower()}"
            for path, found in shares.items()
            if (share := found.get(concern, 0)) >= 0.03
        ]
        if seen:
            items.append(f"- **{concern}**: {' and '.join(seen)} CPU. Change: {proposal}.")
    return "\n".join(items) if items else "Nothing takes 3% or more of either path."
