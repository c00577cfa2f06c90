"""Status polling in production configuration: POST /stkpush/status per store, against the bare
Flask app and against an Express server.

Every server runs the Procfile's web command (harness.start_server) with rate limits on and the
status limit out of reach, so each poll pays the limiter's check and count and none is refused;
the limiter keeps its counters wherever the server puts them for its store. Each store's server
is polled for a completed payment and for a pending one (pushed to a number the simulator leaves
to its handset, which nobody answers).

The protocol: ROUNDS interleaved rounds, each running every target once (wrk -t2 -c32 for SECONDS,
new connections each run); a row's ratio is the median of its per-round ratios (the target over
its reference of the same round). Instructions per poll, counted by callgrind in one worker, stand
beside the ratios as the figure the machine's load does not move. With `--baseline REV` the
server at REV is counted too (a scratch git worktree), so a change shows what it costs a poll.
Rows with rate limits off, or one worker, are diagnostics: they come after the goal rows.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import requests

from bench.harness import (
    ROOT,
    BenchError,
    Context,
    LoadResult,
    Process,
    callgrind_tools,
    checkout,
    completed_payment,
    cpu_seconds,
    fmt,
    free_port,
    instructions_per_request,
    load,
    median,
    pending_payment,
    postgres_database,
    revision_hash,
    server_env,
    server_workers,
    start_express,
    start_redis,
    start_server,
    start_simulator,
    table,
    wrk_path,
)

GOAL_BARE = 0.9  # of the bare Flask app under the same command, per store and poll
GOAL_EXPRESS = 1.0  # of the Express server, Redis store
CONNECTIONS, THREADS = 32, 2  # wrk -t2 -c32
COMPLETED, PENDING = "completed", "pending"
# Rate limits on as in production, the status limit out of reach (one IP polls here).
LIMITS_ON = {"RATELIMIT_ENABLED": "true", "RATE_LIMIT_STATUS_PER_IP": "1000000/second"}
LIMITS_OFF = {"RATELIMIT_ENABLED": "false"}
# The pending payment stays pending through the run (past TRANSACTION_TTL it would be timed out).
KEEP_PENDING = {"TRANSACTION_TTL": 3600}
# Under callgrind polls come some fifty times slower, so the STK Query a pending payment's polls
# send once per STATUS_QUERY_INTERVAL would weigh that much more per poll, and land in a count or
# not by chance: the counts leave it out.
NO_QUERIES = {"STATUS_FIRST_QUERY_AFTER": 3600}
# The operator's dashboard on, as most servers run it.
DASHBOARD_ON = {"ADMIN_TOKEN": "bench-admin-token-0123456789abcdef"}
_phones = itertools.count()  # each pending payment needs a phone of its own: the simulator locks a busy one


@dataclass
class Target:
    """Something every round polls: its status endpoint, the poll, and what each round measured."""

    name: str
    url: str
    body: dict
    pids: Callable[[], list[int]]  # whose CPU time a poll costs (uWSGI's workers, or node)
    serving: str  # "uWSGI, 5 workers", "node, 1 process"
    results: list[LoadResult] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)  # µs of CPU per answered poll, per round

    def run(self, seconds: float, scratch: Path, counted: bool = True) -> None:
        pids = self.pids()
        before = cpu_seconds(pids)
        result = load(self.url, self.body, seconds, CONNECTIONS, scratch, THREADS)
        after = cpu_seconds(pids)
        if not counted:
            return
        self.results.append(result)
        if before is not None and after is not None and result.ok:
            self.cpu.append((after - before) / result.ok * 1e6)

    def rps(self) -> float | None:
        return median(r.rps for r in self.results)

    def errors(self) -> int:
        return sum(r.errors for r in self.results)


@dataclass
class Row:
    """A ratio: a target over its reference, round by round."""

    label: str
    target: str
    against: str
    goal: float | None  # None: a diagnostic
    counted: str | None = None  # the target's key among the instruction counts (its reference: "bare app")
    skipped: str | None = None  # why it did not run


def run(ctx: Context) -> str:
    rounds = ctx.runs(7, 2)
    seconds = 1
    scratch = ctx.scratch("polling")
    sim = start_simulator(ctx)
    redis_url, redis_how = start_redis(ctx)
    postgres_url, postgres_how = postgres_database(ctx)
    stores = [
        ("memory", "memory://", None),
        ("SQLite", f"sqlite:///{scratch / 'payments.db'}", None),
        ("Redis", redis_url, None if redis_url else redis_how),
        ("PostgreSQL", postgres_url, None if postgres_url else postgres_how),
    ]
    targets: dict[str, Target] = {}
    answers: dict[str, requests.Response] = {}  # target name -> our server's answer to its poll
    rows: list[Row] = []
    diagnostics: list[Row] = []

    def serve(name: str, store_url: str, app: str | None = None, **settings) -> Process:
        env = server_env(sim.url, store_url, free_port(), **DASHBOARD_ON, **KEEP_PENDING, **settings)
        ctx.log(f"polling: starting {name}")
        return start_server(ctx, env, app=app, name=name.replace(" ", "-").replace(",", ""))

    def add(name: str, process: Process, body: dict, pids=None) -> Target:
        workers = len(server_workers(process))
        serving = "node, 1 process" if pids else f"uWSGI, {workers} worker" + ("s" if workers > 1 else "")
        targets[name] = Target(
            name, process.url + "/stkpush/status", body, pids or (lambda: server_workers(process)), serving
        )
        return targets[name]

    bare_of = {}  # store -> the bare app target under the same command
    servers = {}  # store -> its server (rate limits on)
    for store, store_url, missing in stores:
        if missing:
            ctx.log(f"!!! {store.upper()} POLLING NOT RUN: {missing} !!!")
            for kind in (COMPLETED, PENDING):
                rows.append(Row(f"{store}, {kind}", "", "", GOAL_BARE, skipped=missing))
            continue
        server = servers[store] = serve(f"{store} store", store_url, **LIMITS_ON)
        for kind, body in _payments(server.url).items():
            add(f"{store}, {kind}", server, body)
            answers[f"{store}, {kind}"] = _answer(server.url, body, kind)
        bare_of[store] = "bare app, " + targets[f"{store}, {COMPLETED}"].serving.removeprefix("uWSGI, ")
        if bare_of[store] not in targets:
            size = len(answers[f"{store}, {COMPLETED}"].content)
            bare = serve(bare_of[store], store_url, app="bench.bare_app:app", BARE_BODY_BYTES=size)
            add(bare_of[store], bare, {"checkoutRequestId": "x"})
            _check_size(bare, size)
        for kind in (COMPLETED, PENDING):
            name = f"{store}, {kind}"
            rows.append(Row(name, name, bare_of[store], GOAL_BARE, counted=name))

    # Diagnostics: what the limiter costs (limits off), and one worker against one Node process.
    memory_off = serve("memory store, rate limits off", "memory://", **LIMITS_OFF)
    add("memory, rate limits off, completed", memory_off, {"checkoutRequestId": completed_payment(memory_off.url)})
    diagnostics.append(
        Row("memory, rate limits off, completed", "memory, rate limits off, completed", bare_of["memory"], None)
    )
    if redis_url:  # the Redis store's payments, seen by these servers too
        redis_off = serve("Redis store, rate limits off", redis_url, **LIMITS_OFF)
        add("Redis, rate limits off, completed", redis_off, targets[f"Redis, {COMPLETED}"].body)
        redis_one = serve("Redis store, one worker", redis_url, WEB_CONCURRENCY=1, **LIMITS_ON)
        add("Redis, one worker, completed", redis_one, targets[f"Redis, {COMPLETED}"].body)
        diagnostics.append(
            Row("Redis, rate limits off, completed", "Redis, rate limits off, completed", bare_of["Redis"], None)
        )

    # The Express anchor, seeded with the Redis store's answers (the same JSON for the same poll).
    express_missing = None if redis_url else f"no Redis store to compare with ({redis_how})"
    if redis_url:
        redis_polls = {kind: targets[f"Redis, {kind}"].body for kind in (COMPLETED, PENDING)}
        seed = {body["checkoutRequestId"]: answers[f"Redis, {kind}"].json() for kind, body in redis_polls.items()}
        try:
            express = start_express(ctx, seed)
        except BenchError as error:
            express_missing = str(error)
        else:
            for kind, body in redis_polls.items():
                add(f"Express, {kind}", express, body, pids=lambda: [express.pid])
                _check_same(express, servers["Redis"].url, body)
            diagnostics.append(
                Row("Redis, one worker, completed", "Redis, one worker, completed", f"Express, {COMPLETED}", None)
            )
    for kind in (COMPLETED, PENDING):
        name = f"Redis, {kind}"
        rows.append(Row(name, name, f"Express, {kind}", GOAL_EXPRESS, skipped=express_missing))
    if express_missing:
        ctx.log(f"!!! EXPRESS NOT RUN: {express_missing} !!!")

    order = sorted(targets.values(), key=_position)
    for target in order:  # warm up every worker, connection pool and JIT; not counted
        target.run(1, scratch, counted=False)
    for number in range(rounds):
        ctx.log(f"polling: round {number + 1} of {rounds}")
        for target in order if number % 2 == 0 else reversed(order):  # every other round backwards
            target.run(seconds, scratch)

    # Idle now; the counts below run on servers of their own.
    ctx.stop(*(process for process in ctx.processes if process.name not in ("simulator", "redis")))
    size = len(answers[f"memory, {COMPLETED}"].content)
    counts, counts_text = _instructions(ctx, sim.url, redis_url, postgres_url, size, scratch)
    client_ok = order[0].results[0].tool == "wrk"
    for row in rows:
        if row.goal is not None and not row.skipped:
            ratio = _ratio(targets, row)
            verdict = _verdict(targets, row, ratio) if client_ok else "unknown (no wrk)"
            ctx.summary.append(
                [
                    f"status polling, {row.label}, rate limits on",
                    f"≥ {row.goal} of the {_reference(row)}",
                    f"{_ratio_text(ratio, row.goal)} ({fmt(targets[row.target].rps())} vs "
                    f"{fmt(targets[row.against].rps())} req/s)" + _counted_text(counts, row),
                    verdict,
                ]
            )
        elif row.skipped:
            ctx.summary.append(
                [f"status polling, {row.label}", f"≥ {row.goal} of the {_reference(row)}", "not run", "—"]
            )

    lines = [
        "## 1. Status polling throughput",
        "",
        *_method(rounds, seconds, answers, targets),
        "",
        "### Goals",
        "",
        _ratio_table(targets, rows, counts, rounds, client_ok),
        "",
        "### Diagnostics",
        "",
        "Not goals: the same polls with rate limits off (what the limiter costs), and one uWSGI "
        "worker against the one Node process.",
        "",
        _ratio_table(targets, diagnostics, counts, rounds, client_ok),
        "",
        "### Every target",
        "",
        _targets_table(order),
        "",
        "CPU per poll: the CPU time (user + system, from `/proc`) of the target's workers (or of the "
        "Node process) during the round, over the polls answered; the median over the rounds. "
        "Latencies: the median over the rounds of `wrk`'s figures.",
    ]
    if redis_url:
        from redis.utils import HIREDIS_AVAILABLE

        parser = "hiredis" if HIREDIS_AVAILABLE else "redis-py's Python parser (hiredis missing)"
        lines += ["", f"Redis: {redis_how}; answers read by {parser}."]
    if postgres_url:
        lines += ["", f"PostgreSQL: {postgres_how}, dropped afterwards."]
    if not wrk_path():
        lines += ["", "!!! wrk was not installed: `scripts/ensure-packages.sh wrk` installs it (root or sudo). !!!"]
    lines += ["", counts_text]
    return "\n".join(lines)


def _payments(server_url: str) -> dict[str, dict]:
    """A completed and a pending payment on the server: the poll body for each."""
    return {
        COMPLETED: {"checkoutRequestId": completed_payment(server_url)},
        PENDING: {"checkoutRequestId": pending_payment(server_url, f"25479800{next(_phones):04d}")},
    }


def _answer(server_url: str, body: dict, kind: str) -> requests.Response:
    answer = requests.post(server_url + "/stkpush/status", json=body, timeout=10)
    if answer.status_code != 200 or answer.json().get("status") != kind:
        raise BenchError(f"the {kind} poll answered {answer.status_code} {answer.text[:200]}")
    return answer


def _check_size(bare: Process, size: int) -> None:
    answer = requests.post(bare.url + "/stkpush/status", json={"checkoutRequestId": "x"}, timeout=10)
    if len(answer.content) != size:
        raise BenchError(f"the bare app answered {len(answer.content)} bytes, not {size}")


def _check_same(express: Process, server_url: str, body: dict) -> None:
    """The Express server answers the poll with the JSON text our server gives now (Flask adds a newline)."""
    answer = requests.post(express.url + "/stkpush/status", json=body, timeout=10)
    ours = requests.post(server_url + "/stkpush/status", json=body, timeout=10)
    if answer.status_code != 200 or answer.text.strip() != ours.text.strip():
        raise BenchError(f"the Express server answered {answer.status_code} {answer.text[:300]}, not {ours.text[:300]}")


def _position(target: Target) -> int:
    """Rounds run the targets in this order (a stable sort: as added within a group)."""
    groups = ["bare app, 1 worker", "memory", "bare app", "SQLite", "PostgreSQL", "Redis", "Express"]
    return next(i for i, prefix in enumerate(groups) if target.name.startswith(prefix))


def _ratios(targets: dict[str, Target], row: Row) -> list[float]:
    ours, theirs = targets[row.target].results, targets[row.against].results
    return [a.rps / b.rps for a, b in zip(ours, theirs, strict=True) if b.rps]


def _ratio(targets: dict[str, Target], row: Row) -> float | None:
    return median(_ratios(targets, row))


def _verdict(targets: dict[str, Target], row: Row, ratio: float | None) -> str:
    if targets[row.target].errors() or targets[row.against].errors():
        return "**no** (errors)"
    return "yes" if ratio is not None and row.goal is not None and ratio >= row.goal else "**no**"


def _reference(row: Row) -> str:
    return "Express server" if row.against.startswith("Express") else "bare app"


def _counted_text(counts: dict[str, float], row: Row) -> str:
    if row.counted in counts and "bare app" in counts:
        return f"; counted {fmt(counts['bare app'] / counts[row.counted], 3)}"
    return ""


def _ratio_table(targets: dict[str, Target], rows: list[Row], counts: dict[str, float], rounds, client_ok) -> str:
    lines = []
    for row in rows:
        if row.skipped:
            lines.append([row.label, _reference(row), "**not run**", "", "", "", "", "", row.skipped])
            continue
        ratios = _ratios(targets, row)
        ratio = median(ratios)
        goal = f"≥ {row.goal}" if row.goal is not None else "diagnostic"
        verdict = "—" if row.goal is None else _verdict(targets, row, ratio) if client_ok else "unknown (no wrk)"
        counted = (
            fmt(counts["bare app"] / counts[row.counted], 3)
            if row.counted in counts and "bare app" in counts and row.against.startswith("bare")
            else "—"
        )
        cpu_ours, cpu_theirs = median(targets[row.target].cpu), median(targets[row.against].cpu)
        lines.append(
            [
                row.label,
                row.against,
                f"**{_ratio_text(ratio, row.goal)}** ({fmt(min(ratios, default=None), 2)} – "
                f"{fmt(max(ratios, default=None), 2)})",
                goal,
                verdict,
                f"{fmt(targets[row.target].rps())} / {fmt(targets[row.against].rps())}",
                fmt(cpu_theirs / cpu_ours, 2) if cpu_ours and cpu_theirs else "—",
                counted,
                targets[row.target].errors() + targets[row.against].errors(),
            ]
        )
    header = [
        "poll",
        "against",
        f"ratio: median of {rounds} rounds (lowest – highest)",
        "goal",
        "met",
        "req/s: poll / against",
        "CPU per poll: against ÷ poll",
        "counted: bare ÷ server instructions",
        "errors",
    ]
    return table(header, lines)


def _targets_table(order: list[Target]) -> str:
    rows = [
        [
            target.name,
            target.serving,
            fmt(target.rps()),
            ", ".join(fmt(r.rps) for r in target.results),
            fmt(median(target.cpu)),
            f"{fmt(median(r.p50_ms for r in target.results), 1)} / {fmt(median(r.p99_ms for r in target.results), 1)}",
            target.errors(),
        ]
        for target in order
    ]
    return table(["target", "served by", "req/s", "every round", "CPU µs per poll", "p50 / p99 ms", "errors"], rows)


def _method(rounds: int, seconds: int, answers: dict[str, requests.Response], targets: dict[str, Target]) -> list[str]:
    completed = answers.get(f"memory, {COMPLETED}")
    pending = answers.get(f"memory, {PENDING}")
    sizes = f" ({len(completed.content)} and {len(pending.content)} bytes of JSON)" if completed and pending else ""
    express = "Express, completed" in targets
    return [
        "`POST /stkpush/status` in production configuration: every server runs the `Procfile`'s web "
        "command, `PROMETHEUS_MULTIPROC_DIR=<a new folder> python serve.py` (uWSGI), with the workers "
        "and threads `serve.py` picks for the store. Rate limits are on (`RATELIMIT_ENABLED=true`) with "
        "the status limit out of reach (`RATE_LIMIT_STATUS_PER_IP=1000000/second`), so every poll "
        "pays the limiter's check and count and none is refused; the limiter keeps its counters "
        "where the server puts them for its store. The dashboard is on (`ADMIN_TOKEN` set). Each "
        "store's server is polled for a completed payment and for a pending one" + sizes + ": the "
        "pending payment was pushed to a number the simulator leaves to its handset, which nobody "
        "answers, and `TRANSACTION_TTL=3600` keeps it pending through the run; the STK Query "
        "throttle works as in production (`STATUS_FIRST_QUERY_AFTER` and `STATUS_QUERY_INTERVAL` "
        "at their defaults), so now and then a poll asks the simulator, which answers that the "
        "payment is still being processed.",
        "",
        "References: the bare Flask app (`bench/bare_app.py`: reads the JSON body, answers a "
        "completed-payment body of the same size; no store, limiter or log line) under the same "
        "command and workers (`python serve.py --app bench.bare_app:app`); and "
        + (
            "an Express server (`bench/express/`: Express 4 with `cors()` and `express.json()`, one "
            "Node process, the payments in a `Map`), seeded with the Redis store server's answers "
            "and checked to answer each poll with the same JSON text (Flask's body alone ends with a newline)."
            if express
            else "an Express server (`bench/express/`), **not run** this time (see the goals)."
        ),
        "",
        f"The protocol: {rounds} rounds, after one uncounted warm-up run of every target. A round "
        "runs every target once, in a fixed order (the table of targets below; every other round "
        "backwards, so that no target always follows the same one): "
        f"`wrk -t{THREADS} -c{CONNECTIONS} -d{seconds}s` (a Lua script for the POST body), new "
        "connections for every run. A row's ratio is the median of its per-round ratios: the "
        "target's polls per second over its reference's in the same round, so that what the machine "
        "does meanwhile (other work on its cores, how the server's workers happened to share the "
        "connections of one run) reaches both sides alike and one odd round does not move the "
        "result. The lowest and highest per-round ratios are shown beside it. Every answer must be "
        "a 200: a goal with errors counts as not met. Beside the ratio stand two steadier figures: "
        "the CPU time a poll costs the reference over what it costs the target (the median per "
        "round of each, from `/proc`; it moves less with the machine's load than polls per second "
        "do), and the instruction count (below): the share of the bare app's speed the server "
        "would reach if user-space instructions were all a poll cost, which the machine's load "
        "does not move.",
    ]


def _instructions(
    ctx: Context, simulator_url: str, redis_url: str | None, postgres_url: str | None, size: int, scratch: Path
) -> tuple[dict[str, float], str]:
    """Instructions per poll in one worker, counted by callgrind: the ratio without the machine's noise."""
    polls = 300
    if callgrind_tools() is None:
        return {}, (
            "### Instructions per poll\n\n!!! valgrind is not installed, so the instructions per poll "
            "were not counted: `scripts/ensure-packages.sh valgrind` installs it. !!!"
        )
    ctx.log("polling: counting instructions per poll, bare app")
    counts = instructions_per_request(
        ctx,
        server_env(simulator_url, "memory://", free_port(), BARE_BODY_BYTES=size),
        "bench.bare_app:app",
        "/stkpush/status",
        lambda url: {"bare app": {"checkoutRequestId": "x"}},
        polls,
    )
    counts.update(_server_counts(ctx, simulator_url, redis_url, postgres_url, polls, scratch / "callgrind"))
    ceiling = counts["bare app"]
    rows = [
        [
            name,
            fmt(count),
            "—" if name == "bare app" else f"+{fmt(count - ceiling)}",
            "1" if name == "bare app" else f"**{fmt(ceiling / count, 3)}**",
        ]
        for name, count in counts.items()
    ]
    lines = [
        "### Instructions per poll",
        "",
        f"The same polls counted instead of timed: valgrind's callgrind counts the machine "
        f"instructions the server's processes execute (the same command and settings, rate limits on, "
        f"with one worker so that the count repeats) over {polls:,} polls from 4 keep-alive "
        "connections, after 100 to warm up. The polls of a pending payment are counted without the "
        "STK Query they send Daraja now and then (`STATUS_FIRST_QUERY_AFTER=3600` for the count): at "
        "full speed one query per `STATUS_QUERY_INTERVAL` is spread over thousands of polls, under "
        "callgrind over a hundred or so, and whether one fell in a count would be chance. "
        "Only user space is counted; the kernel's work (system "
        "calls, scheduling), about the same per poll for both apps, is not. The count does not depend "
        "on what else the machine is doing and repeats to within about one percent.",
        "",
        table(["poll", "instructions per poll", "above the bare app", "bare ÷ poll"], rows),
    ]
    if ctx.baseline:
        lines += ["", _baseline(ctx, ctx.baseline, simulator_url, redis_url, postgres_url, polls, scratch, counts)]
    return counts, "\n".join(lines)


def _server_counts(
    ctx: Context,
    simulator_url: str,
    redis_url: str | None,
    postgres_url: str | None,
    polls: int,
    scratch: Path,
    cwd: Path = ROOT,
) -> dict[str, float]:
    """Instructions per poll, completed and pending, of the server started in cwd, per store."""
    scratch.mkdir(parents=True, exist_ok=True)
    stores = [("memory", "memory://"), ("SQLite", f"sqlite:///{scratch / 'payments.db'}")]
    stores += [("Redis", redis_url)] if redis_url else []
    stores += [("PostgreSQL", postgres_url)] if postgres_url else []
    counts = {}
    for name, store_url in stores:
        ctx.log(f"polling: counting instructions per poll, {name}" + ("" if cwd == ROOT else f" at {ctx.baseline}"))
        settings = {"WEB_CONCURRENCY": 1, **DASHBOARD_ON, **KEEP_PENDING, **LIMITS_ON, **NO_QUERIES}
        found = instructions_per_request(
            ctx,
            server_env(simulator_url, store_url, free_port(), **settings),
            None,
            "/stkpush/status",
            _payments,
            polls,
            cwd=cwd,
        )
        counts.update({f"{name}, {kind}": count for kind, count in found.items()})
    return counts


def _baseline(
    ctx: Context,
    revision: str,
    simulator_url: str,
    redis_url: str | None,
    postgres_url: str | None,
    polls: int,
    scratch: Path,
    now: dict[str, float],
) -> str:
    """The server at a git revision counted as the current one was, beside it: what a change costs a poll."""
    short = revision_hash(revision) or "?"
    label = revision if short.startswith(revision) else f"{revision} ({short})"
    try:
        with checkout(ctx, revision) as tree:
            before = _server_counts(
                ctx, simulator_url, redis_url, postgres_url, polls, scratch / "callgrind-baseline", cwd=tree
            )
    except BenchError as error:  # the counts above still stand
        return f"**Not counted at `{label}` (`--baseline`):** {error}"
    rows = [
        [name, fmt(count), fmt(now[name]), f"{(now[name] - count) / count:+.1%}"]
        for name, count in before.items()
        if name in now
    ]
    return "\n".join(
        [
            f"Against `{label}` (`--baseline`): its server code, checked out in a scratch git worktree and "
            "started from there (its own `Procfile` command), counted in this run with the same Python, "
            "simulator, settings and polls as the rows above.",
            "",
            table(["poll", f"at {label}", "now", "change"], rows),
            "",
            f"The count's own spread over {polls:,} polls is about one percent (the same code counted twice: "
            "up to 0.8 %); a smaller change is noise.",
        ]
    )


def _ratio_text(ratio: float | None, goal: float | None) -> str:
    """Two decimals, or three where two would round across the goal (0.899 is not 0.90)."""
    if ratio is not None and goal is not None and (round(ratio, 2) >= goal) != (ratio >= goal):
        return fmt(ratio, 3)
    return fmt(ratio, 2)
