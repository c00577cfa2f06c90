"""Where the time goes: py-spy samples the gunicorn worker during status polls and pushes.

py-spy (from .bench-venv/, never the project's venv) attaches to the one worker of a
memory-store server without pausing it (--nonblocking) while wrk (or the Python generator)
polls a completed payment, then while 50 threads push. Only the thread holding the GIL is
sampled (--gil), so the shares are of the worker's Python CPU time, not of threads waiting.
The tables give each function's share of the samples with it on the stack (inclusive) or at
the top (self); the findings turn the large shares into proposed changes. A micro-benchmark
then times the store's record encoding and decoding against a shallow alternative.
"""
from __future__ import annotations

import json
import re
import subprocess
import time
from collections import Counter
from dataclasses import fields
from pathlib import Path

import store
from bench.bench_memory import Clock, record
from bench.harness import (ROOT, BenchError, Context, bench_venv_python, completed_payment, free_port,
                           gunicorn_workers, load, post_batch, server_env, start_gunicorn, start_simulator,
                           table)

FRAME = re.compile(r"^(?P<function>.+) \((?P<file>[^:()]+)(?::\d+)?\)$")
CONCERNS = [  # label, test on a frame's (file, function); none of them wraps the view
    ("logging (the per-request line and others)", lambda f, fn: f.startswith("logging/")),
    ("gunicorn access-log atoms, built then dropped", lambda f, fn: f == "gunicorn/glogging.py"
     and fn.startswith(("Logger.access", "Logger.atoms"))),
    ("JSON encode/decode", lambda f, fn: f.startswith(("json/", "flask/json"))),
    ("store.py (reads, writes, encoding)", lambda f, fn: f == "store.py"),
    ("copy.deepcopy", lambda f, fn: f == "copy.py"),
    ("dataclasses.asdict", lambda f, fn: f == "dataclasses.py" and "asdict" in fn),
    ("Flask-Limiter request check (limits off)", lambda f, fn: f.startswith("flask_limiter/")
     and ("check_request_limit" in fn or "evaluate_limits" in fn)),
    ("Flask-CORS after_request", lambda f, fn: f.startswith("flask_cors/") and "after_request" in fn),
    ("request metrics (metrics.py, prometheus_client)", lambda f, fn: f.startswith("prometheus_client/")
     or (f == "metrics.py" and fn == "request_served")),
    ("uuid (request ids)", lambda f, fn: f == "uuid.py"),
    ("outgoing HTTP to Daraja (requests, urllib3)", lambda f, fn: f.startswith(("requests/", "urllib3/"))),
    ("requests reading proxy settings from the environment", lambda f, fn: f.startswith("requests/")
     and ("merge_environment_settings" in fn or "get_environ_proxies" in fn)),
]


def run(ctx: Context) -> str:
    python = bench_venv_python(ctx)
    py_spy = python.parent / "py-spy"
    if not py_spy.exists():
        raise BenchError("py-spy is not in .bench-venv (bench/peers-requirements.txt)")
    seconds = 3.0 if ctx.quick else 6.0
    own_files = {path.name for path in ROOT.glob("*.py")}

    sim = start_simulator(ctx)
    server = start_gunicorn(ctx, server_env(sim.url, "memory://", free_port()), name="server-profiled")
    workers = gunicorn_workers(server)
    if len(workers) != 1:
        raise BenchError(f"expected one gunicorn worker for the memory store, found {workers}")
    checkout_id = completed_payment(server.url)
    scratch = ctx.scratch("profile")

    ctx.log("profile: status polls under py-spy")
    poll_stacks = _record(py_spy, workers[0], seconds, scratch / "poll.txt", lambda: load(
        server.url + "/stkpush/status", {"checkoutRequestId": checkout_id}, seconds - 1, 32, scratch))
    ctx.log("profile: pushes under py-spy")
    pushes = 300 if ctx.quick else 1000
    jobs = [(server.url + "/stkpush", {"phone": f"25472{i:07d}", "amount": 10}, {}) for i in range(pushes)]
    push_stacks = _record(py_spy, workers[0], seconds, scratch / "push.txt",
                          lambda: post_batch(jobs, 50, deadline_seconds=seconds * 3))

    micro, speedups = _micro(ctx)
    sections, shares = [], {}
    for title, stacks in (("Status poll (`POST /stkpush/status`, completed payment)", poll_stacks),
                          ("Push (`POST /stkpush`)", push_stacks)):
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
        _findings(shares, speedups),
        *sections,
        "",
        "### Encoding and decoding a stored record",
        "",
        micro,
    ]
    return "\n".join(lines)


def _record(py_spy: Path, pid: int, seconds: float, output: Path, work) -> Counter:
    """Run work() while py-spy records pid; return the collapsed stacks."""
    command = [str(py_spy), "record", "--pid", str(pid), "--duration", str(int(seconds)), "--rate", "250",
               "--nonblocking", "--gil", "--format", "raw", "--output", str(output)]
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
    # Only request-handling stacks: the worker's main loop and heartbeat are not the path.
    stacks = Counter({stack: n for stack, n in stacks.items() if "handle_request" in stack})
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

    parts = [f"{total:,} samples of request handling holding the GIL.", "",
             "**Self time by component** (where the interpreter actually was):", "",
             table(["component", "share"], [[name, share(n)] for name, n in components.most_common(10)]),
             "", "**Inclusive, by concern** (a sample may count under several):", "",
             table(["concern", "share"], [[name, share(n)] for name, n in concerns.most_common()]),
             "", "**Our code, inclusive:**", "",
             table(["function", "share"], [[label, share(n)] for label, n in inclusive.most_common(10)]),
             "", "**Hottest functions, self:**", "",
             table(["function", "share"], [[label, share(n)] for label, n in self_time.most_common(8)])]
    return "\n".join(parts), {name: n / total for name, n in concerns.items()}


def _component(file: str, own_files: set[str]) -> str:
    """`store.py` for our files, else the package or stdlib module a frame's file belongs to."""
    if file in own_files:
        return f"our `{file}`"
    if file.startswith("<frozen "):
        file = file[len("<frozen "):].rstrip(">")
    return file.split("/")[0].removesuffix(".py")


def _version(py_spy: Path) -> str:
    try:
        return subprocess.run([str(py_spy), "--version"], capture_output=True, text=True,
                              timeout=10).stdout.split()[-1]
    except (OSError, subprocess.SubprocessError, IndexError):
        return "?"


# A shallow encode/decode: json.dumps does not need asdict's deep copy, and json.loads
# already returns fresh objects, so from_dict's deepcopy copies what nobody else holds.
_KNOWN = tuple(f.name for f in fields(store.Transaction))


def shallow_encode(tx: store.Transaction) -> str:
    return json.dumps({name: getattr(tx, name) for name in _KNOWN}, ensure_ascii=False, separators=(",", ":"))


def shallow_decode(text: str) -> store.Transaction:
    data = json.loads(text)
    return store.Transaction(**{name: data[name] for name in _KNOWN if name in data})


def _micro(ctx: Context) -> str:
    repeat = 2000 if ctx.quick else 5000
    completed = record(1, Clock().now)
    pending = store.Transaction(**{**completed.to_dict(), "status": "pending", "callback": None,
                                   "history": completed.history[:2], "mpesa_receipt_number": None})
    rows, speedups = [], {}
    for name, tx in (("completed (5 events, raw callback)", completed), ("pending (2 events)", pending)):
        text = store._encode(tx)
        if shallow_encode(tx) != text or shallow_decode(text) != store._decode(text):
            raise BenchError("the shallow encode/decode does not reproduce store._encode/_decode")
        timings = []
        for function, argument in ((store._encode, tx), (shallow_encode, tx),
                                   (store._decode, text), (shallow_decode, text)):
            began = time.perf_counter()
            for _ in range(repeat):
                function(argument)
            timings.append((time.perf_counter() - began) / repeat * 1e6)
        rows.append([name, f"{timings[0]:.0f} µs", f"{timings[1]:.0f} µs", f"{timings[2]:.0f} µs",
                     f"{timings[3]:.0f} µs"])
        speedups[name] = (timings[0] / timings[1], timings[2] / timings[3])
    return "\n".join([
        f"Mean of {repeat:,} calls each, in-process. `store._encode` is "
        "`json.dumps(dataclasses.asdict(tx))` (asdict deep-copies every list and dict first) and "
        "`store._decode` is `Transaction.from_dict(json.loads(text))` (from_dict deep-copies every value "
        "json.loads just created). The shallow versions give identical text and equal records:",
        "",
        "```python",
        "def _encode(tx):",
        "    return json.dumps({f: getattr(tx, f) for f in _FIELDS}, ensure_ascii=False, separators=(',', ':'))",
        "",
        "def _decode(text):",
        "    data = json.loads(text)",
        "    return Transaction(**{f: data[f] for f in _FIELDS if f in data})",
        "```",
        "",
        table(["record", "encode now", "encode shallow", "decode now", "decode shallow"], rows),
    ]), speedups


# What to change when a concern takes a material share of a path (shown from 3%).
PROPOSALS = {
    "logging (the per-request line and others)":
        "the per-request INFO line (`register_request_log.finish` in server.py, formatted as JSON by "
        "metrics.py): log successful status polls at DEBUG, or sample them, and keep INFO for pushes, "
        "callbacks, errors and slow requests",
    "gunicorn access-log atoms, built then dropped":
        "`logconfig_dict` in gunicorn.conf.py makes gunicorn build the access-log atoms of every request "
        "although `accesslog = None` and `gunicorn.access` has no handler: set `logger_class` to a "
        "`gunicorn.glogging.Logger` subclass whose `access()` returns at once",
    "request metrics (metrics.py, prometheus_client)":
        "prometheus-client runs in multiprocess mode (gunicorn.conf.py always sets "
        "PROMETHEUS_MULTIPROC_DIR), so each observation writes an mmap'd file under a lock: set it only "
        "when gunicorn runs more than one worker (the memory store runs one)",
    "store.py (reads, writes, encoding)":
        "`store._encode`/`_decode` copy every record deeply (`asdict`, then `from_dict`'s deepcopy of "
        "what `json.loads` just made): use the shallow versions below",
    "Flask-Limiter request check (limits off)":
        "Flask-Limiter still checks every request with `RATELIMIT_ENABLED=false`: when limits are off, "
        "do not create the Limiter (no-op decorators); with limits on it costs more than this, so "
        "measure `RATELIMIT_ENABLED=true` before trusting these polling numbers for production",
    "requests reading proxy settings from the environment":
        "requests re-reads the proxy variables from `os.environ` on every Daraja call (`trust_env`): "
        "resolve them once when `mpesa.Daraja` is built (`session.proxies = "
        "requests.utils.get_environ_proxies(base_url)`, `session.trust_env = False`, and "
        "`REQUESTS_CA_BUNDLE` into `session.verify` if set)",
}


def _findings(shares: dict, speedups: dict) -> str:
    """The proposals whose concern takes at least 3% of a path's Python CPU time."""
    items = []
    for concern, proposal in PROPOSALS.items():
        seen = [f"{share * 100:.0f}% of {path.lower()}" for path, found in shares.items()
                if (share := found.get(concern, 0)) >= 0.03]
        if seen:
            items.append(f"- **{concern}**: {' and '.join(seen)} CPU. Change: {proposal}.")
    for name, (encode, decode) in speedups.items():
        items.append(f"- Shallow encode/decode of a {name} record: encode {encode:.1f}× and decode "
                     f"{decode:.1f}× faster, same bytes (table below).")
    return "\n".join(items) if items else "Nothing takes 3% or more of either path."
