"""Status polling throughput: POST /stkpush/status for a completed payment, per store.

Each store's server runs under the Procfile's gunicorn configuration (gunicorn.conf.py:
memory one worker, SQLite and Redis 2 x cores + 1 workers; 8 threads each) with the dashboard
on and rate limits off, beside bench/bare_app.py under the same configuration: the ceiling for
this stack.
Rounds are interleaved (bare, memory, bare, SQLite, Redis, then again, one second each, three
times a round) so drift on the machine hits every target alike; the table shows medians. A
second in which one of several workers served every poll (wrk's connections all landed on it)
is run again, for every target alike; the ratios with those seconds counted are given too.
Instructions per poll are counted with callgrind as well; with `--baseline REV` also for the
server code at REV (a scratch git worktree), so a change shows what it costs a poll.
"""

from __future__ import annotations

from pathlib import Path

import requests

from bench.harness import (
    ROOT,
    BenchError,
    Context,
    LoadResult,
    callgrind_tools,
    checkout,
    completed_payment,
    cpu_seconds,
    fmt,
    free_port,
    gunicorn_workers,
    instructions_per_request,
    load,
    median,
    revision_hash,
    server_env,
    start_gunicorn,
    start_redis,
    start_simulator,
    table,
    wrk_path,
)

GOAL = 0.9
CONNECTIONS = 32
# A round runs each target this many times for a second (wrk's shortest run), interleaved: every
# wrk run opens its connections anew, and a several-worker server deals them out anew to its workers.
DEALS = 3
LIMITED = "memory, rate limits on"
# On as in production, with limits no benchmark client reaches (one IP polls here).
LIMITS_ON = {"RATELIMIT_ENABLED": "true", "RATE_LIMIT_STATUS_PER_IP": "100000000/minute"}
UNLOGGED = "memory, no request log line"
# A diagnostic, not a setting: the server's logger raised to WARNING at interpreter start-up
# (sitecustomize), to show what the one INFO line per request costs under gunicorn.
QUIET_LOGGER = 'import logging\nlogging.getLogger("server").setLevel(logging.WARNING)\n'
DIAGNOSTICS = (LIMITED, UNLOGGED)
LOPSIDED = 0.8  # a second where one worker used this share of the workers' CPU time is lopsided
# A lopsided second is run again, up to this many times: it measures how gunicorn's workers raced
# to accept the connections wrk opened at once, a draw both apps make alike, not what a poll costs.
REDEALS = 2
SERVING = 0.1  # a worker that used this share of the workers' CPU time in a run counts as serving in it
# The operator's dashboard on, as most servers run: a secret key then exists, and Flask would
# open a cookie session for every request if admin.SessionInterface let it.
DASHBOARD_ON = {"ADMIN_TOKEN": "bench-admin-token-0123456789abcdef"}


def run(ctx: Context) -> str:
    rounds = ctx.runs(6, 1)
    scratch = ctx.scratch("polling")
    sim = start_simulator(ctx, auto_delay=0.1)
    redis_url, redis_how = start_redis(ctx)
    if redis_url is None:
        ctx.log(f"!!! REDIS POLLING NOT RUN: {redis_how} !!!")

    stores = [("memory", "memory://"), ("SQLite", f"sqlite:///{scratch / 'payments.db'}")]
    if redis_url:
        stores.append(("Redis", redis_url))
    # Not goal rows: what Flask-Limiter costs per poll when limits are on, as they are by
    # default, and what the request's log line costs.
    stores += [(LIMITED, "memory://"), (UNLOGGED, "memory://")]
    quiet = scratch / "quiet-logger"
    quiet.mkdir(exist_ok=True)
    (quiet / "sitecustomize.py").write_text(QUIET_LOGGER)
    extra_settings = {LIMITED: LIMITS_ON, UNLOGGED: {"PYTHONPATH": str(quiet)}}

    targets = {}  # name -> (url, body)
    bodies = {}
    servers = {}  # name -> its gunicorn (master) process
    for name, url in stores:
        ctx.log(f"polling: starting the server with the {name} store")
        settings = {**DASHBOARD_ON, **extra_settings.get(name, {})}
        server = start_gunicorn(
            ctx, server_env(sim.url, url, free_port(), **settings), name=f"server-{name.split(',')[0]}-{len(targets)}"
        )
        checkout_id = completed_payment(server.url)
        body = {"checkoutRequestId": checkout_id}
        answer = requests.post(server.url + "/stkpush/status", json=body, timeout=10)
        if answer.status_code != 200 or answer.json().get("status") != "completed":
            raise BenchError(f"{name}: the status poll answered {answer.status_code} {answer.text[:200]}")
        bodies[name] = len(answer.content)
        targets[name] = (server.url + "/stkpush/status", body)
        servers[name] = server

    size = bodies["memory"]
    bare = {}
    for label, store_url in (("1 worker", "memory://"), ("several workers", stores[1][1])):
        env = server_env(sim.url, store_url, free_port(), BARE_BODY_BYTES=size)
        process = start_gunicorn(ctx, env, app="bench.bare_app:app", name=f"bare-{label}")
        answer = requests.post(process.url + "/stkpush/status", json={"checkoutRequestId": "x"}, timeout=10)
        if len(answer.content) != size:
            raise BenchError(f"the bare app answered {len(answer.content)} bytes, not {size}")
        bare[label] = (process.url + "/stkpush/status", {"checkoutRequestId": "x"})
        servers["bare " + label] = process
    workers = {
        "memory": "1 worker",
        "SQLite": "several workers",
        "Redis": "several workers",
        LIMITED: "1 worker",
        UNLOGGED: "1 worker",
    }

    order = [
        ("bare 1 worker", bare["1 worker"]),
        ("memory", targets["memory"]),
        (LIMITED, targets[LIMITED]),
        (UNLOGGED, targets[UNLOGGED]),
        ("bare several workers", bare["several workers"]),
    ]
    order += [(name, targets[name]) for name in ("SQLite", "Redis") if name in targets]
    results: dict[str, list] = {name: [] for name, _ in order}  # per round: its deals together
    cpu: dict[str, list] = {name: [] for name, _ in order}  # per round: worker CPU µs per answered poll
    redealt: dict[str, list] = {name: [] for name, _ in order}  # per round: its lopsided seconds run again
    first_draws: dict[str, list] = {name: [] for name, _ in order}  # per round: its deals as first drawn
    stayed = 0  # lopsided seconds kept after REDEALS more tries
    errors: dict[str, int] = {name: 0 for name, _ in order}  # over every second run
    serving: dict[str, list] = {name: [] for name, _ in order}  # per round: workers that served each deal
    if not ctx.quick:
        for _name, (url, body) in order:  # warm up every worker and connection pool
            load(url, body, 1, CONNECTIONS, scratch)
    for round_number in range(rounds):
        deals: dict[str, list] = {name: [] for name, _ in order}
        for deal in range(DEALS):
            for name, (url, body) in order:
                ctx.log(f"polling: round {round_number + 1}/{rounds}, deal {deal + 1}/{DEALS}: {name}")
                deals[name].append(_deal(servers[name], url, body, scratch))
        for name, _ in order:
            results[name].append(_together([result for result, _, _ in deals[name]]))
            first_draws[name].append(
                _together([redrawn[0] if redrawn else result for result, _, redrawn in deals[name]])
            )
            used = [shares for _, shares, _ in deals[name]]
            redealt[name].append(sum(len(redrawn) for _, _, redrawn in deals[name]))
            stayed += sum(_lopsided(shares) for _, shares, _ in deals[name])
            errors[name] += sum(r.errors for result, _, redrawn in deals[name] for r in [result, *redrawn])
            if all(used):
                cpu[name].append(sum(map(sum, used)) / results[name][-1].ok * 1e6)
                several = len(used[0]) > 1
                serving[name].append(
                    [sum(share >= SERVING * sum(shares) for share in shares) for shares in used] if several else None
                )
            else:
                serving[name].append(None)

    def rps(name, rounds=results):
        return median(r.rps for r in rounds[name])

    rows = []
    verdicts = []
    as_drawn = []  # the several-worker ratios with the lopsided seconds counted
    client_ok = results["memory"][0].tool == "wrk"
    for name, _ in stores:
        ceiling_name = "bare " + workers[name]
        ours, ceiling = rps(name), rps(ceiling_name)
        ratio = ours / ceiling if ours and ceiling else None
        met = ratio is not None and ratio >= GOAL
        drawn_text = ""
        if workers[name] == "several workers":
            ours_drawn, ceiling_drawn = rps(name, first_draws), rps(ceiling_name, first_draws)
            drawn_text = _ratio_text(ours_drawn / ceiling_drawn if ours_drawn and ceiling_drawn else None)
            as_drawn.append(f"{name} {drawn_text}")
        # The Python generator saturates before the bare app does: its ratios say nothing.
        verdict = ("yes" if met else "**no**") if client_ok else "unknown (no wrk)"
        if name in DIAGNOSTICS:
            verdict = "(not a goal)"
        else:
            verdicts.append(f"{name} {_ratio_text(ratio)} ({verdict})")
            ctx.summary.append(
                [
                    f"status polling, {name} store",
                    f"≥ {GOAL} of the bare app",
                    f"{_ratio_text(ratio)} ({fmt(ours)} vs {fmt(ceiling)} req/s"
                    + (f"; {drawn_text} with lopsided seconds counted)" if drawn_text else ")"),
                    verdict,
                ]
            )
        cpu_ours, cpu_ceiling = median(cpu[name]), median(cpu[ceiling_name])
        cpu_text = (
            f"{fmt(cpu_ours)} / {fmt(cpu_ceiling)} ({fmt(cpu_ceiling / cpu_ours, 2)})"
            if cpu_ours and cpu_ceiling
            else "—"
        )
        rows.append(
            [
                name,
                _workers_text(workers[name]),
                fmt(ours),
                fmt(ceiling),
                f"**{_ratio_text(ratio)}**",
                verdict,
                cpu_text,
                f"{fmt(median(r.p50_ms for r in results[name]), 1)} / "
                f"{fmt(median(r.p99_ms for r in results[name]), 1)}",
                f"{fmt(median(r.p50_ms for r in results[ceiling_name]), 1)} / "
                f"{fmt(median(r.p99_ms for r in results[ceiling_name]), 1)}",
                errors[name],
            ]
        )
    if not redis_url:
        rows.append(["Redis", "—", "**skipped**", "", "", "", "", "", "", redis_how])

    tool = results["memory"][0].tool
    runs_text = "; ".join(
        f"{name}: "
        + ", ".join(
            _run_text(r.rps, again, served)
            for r, again, served in zip(results[name], redealt[name], serving[name], strict=True)
        )
        for name, _ in order
    )
    several = [name for name, _ in order if any(serving[name])]
    seconds_kept = sum(len(deals) for name in several for deals in serving[name] if deals)
    run_again = sum(sum(redealt[name]) for name in several)
    lines = [
        "## 1. Status polling throughput",
        "",
        f"`POST /stkpush/status` for a completed payment, {CONNECTIONS} keep-alive connections, "
        f"median of {rounds} round(s); a round runs every target {DEALS} times for 1 s, interleaved "
        "(new connections each time), and counts the polls over its seconds; load from "
        + (
            "`wrk` (1 thread, a Lua script for the POST body)"
            if tool == "wrk"
            else "the Python generator (threads with pooled sessions; **wrk is not installed**, "
            "so the client, not the server, may be the limit)"
        )
        + ". "
        "Servers: `gunicorn -c gunicorn.conf.py server:app` with the dashboard on (`ADMIN_TOKEN` set) "
        "and `RATELIMIT_ENABLED=false` (the row "
        f"*{LIMITED}*: `RATELIMIT_ENABLED=true` with `RATE_LIMIT_STATUS_PER_IP` set out of reach, "
        "so every poll pays Flask-Limiter's check and count as in production; the row "
        f"*{UNLOGGED}*: the `server` logger raised to WARNING by a `sitecustomize.py` on "
        "`PYTHONPATH`, a diagnostic of what the one log line per request costs, not a setting); ceiling: "
        "`gunicorn -c gunicorn.conf.py bench.bare_app:app` (same workers and threads, "
        f"a JSON body of the same {size} bytes). Both bound to 127.0.0.1.",
        "",
        table(
            [
                "store",
                "gunicorn",
                "server req/s",
                "bare app req/s",
                "ratio",
                f"≥ {GOAL}",
                "CPU µs per poll, server / bare (bare ÷ server)",
                "server p50 / p99 ms",
                "bare p50 / p99 ms",
                "errors",
            ],
            rows,
        ),
        "",
        f"Goal: ratio ≥ {GOAL}. Result: " + ", ".join(verdicts) + ".",
        "",
        "CPU per poll: the gunicorn workers' CPU time (user + system, from `/proc`) over each round, "
        "divided by the polls answered, median over the rounds. Latencies: the median of every "
        "second's figures. CPU per poll varies less from run to run than "
        "requests per second, which also depend on how the machine shares its cores between the "
        "load generator and the server at that moment. Most of it is gunicorn's own work, which both "
        "apps pay.",
        "",
        "Every round (req/s; with several workers, how many of them served the polls in each of its "
        f"seconds, each using at least {SERVING:.0%} of the workers' CPU time): {runs_text}.",
        "",
        "gunicorn's workers share one listening socket and race to accept the connections `wrk` opens "
        f"at once, so each `wrk` run deals a several-worker server's {CONNECTIONS} connections out anew, "
        f"to one worker or to all {_several_workers()}. How many serve moves the rate more than "
        "anything else in a second (on 2 cores: one worker alone is held to one core by its GIL, two "
        "use both cores, more switch between processes more), and both apps draw from the same "
        f"lottery: each round takes {DEALS} draws, so that one draw moves a round less. In a lopsided "
        f"second one of the workers used at least {LOPSIDED:.0%} of the workers' CPU time and served "
        "the polls alone, at about half the usual rate: that measures the race to accept, not what a "
        f"poll costs, so it is run again, up to {REDEALS} times, for the bare app and the server alike. "
        f"Seconds run again: {run_again} ("
        + ", ".join(f"{name} {sum(redealt[name])}" for name in several)
        + f"), for {seconds_kept} kept; lopsided still after {REDEALS} more tries, and counted: {stayed}. "
        "The ratios with the lopsided seconds counted, each second as first drawn: "
        + (", ".join(as_drawn) or "—")
        + ".",
    ]
    if redis_url:
        from redis.utils import HIREDIS_AVAILABLE

        parser = "hiredis" if HIREDIS_AVAILABLE else "redis-py's Python parser (hiredis missing)"
        lines += ["", f"Redis: {redis_how}; answers read by {parser}."]
    if not wrk_path():
        lines += ["", "!!! wrk was not installed: `scripts/ensure-packages.sh wrk` installs it (root or sudo). !!!"]
    if len(set(bodies.values())) > 1:
        lines += ["", f"Note: answer sizes differ between stores: {bodies}."]
    for name in list(servers):  # idle now; the counts below run on servers of their own
        ctx.stop(servers.pop(name))
    lines += ["", _instructions(ctx, sim.url, redis_url, size, scratch)]
    return "\n".join(lines)


def _instructions(ctx: Context, simulator_url: str, redis_url: str | None, size: int, scratch) -> str:
    """Instructions per poll in one worker, counted by callgrind: the ratio without the machine's noise."""
    polls = 300 if ctx.quick else 1000
    if callgrind_tools() is None:
        return (
            "### Instructions per poll\n\n!!! valgrind is not installed, so the instructions per poll "
            "were not counted: `scripts/ensure-packages.sh valgrind` installs it. !!!"
        )
    ctx.log("polling: counting instructions per poll, bare app")
    counts = {
        "bare app": instructions_per_request(
            ctx,
            server_env(simulator_url, "memory://", free_port(), BARE_BODY_BYTES=size),
            "bench.bare_app:app",
            "/stkpush/status",
            {"checkoutRequestId": "x"},
            polls,
        )
    }
    counts.update(_server_counts(ctx, simulator_url, redis_url, polls, scratch / "callgrind"))
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
        f"The same polls counted instead of timed: valgrind's callgrind counts the machine instructions "
        f"the server's processes execute (gunicorn, one worker with its 8 threads) over {polls:,} polls "
        "from 4 keep-alive connections, after 200 to warm up. SQLite and Redis run as they do with "
        "several workers (prometheus-client's multiprocess files), in one worker so that the count "
        "repeats. Only user space is counted; the kernel's work (system calls, scheduling), about the "
        "same per poll for both apps, is not. The count does not depend on what else the machine is "
        "doing and repeats to within about half a percent, where the ratios above move with the "
        "machine's load from run to run.",
        "",
        table(["app", "instructions per poll", "above the bare app", "bare ÷ app"], rows),
        "",
        "A ratio here is the share of the bare app's speed the server would reach if both spent all "
        "their time in user space; the kernel's equal share per poll moves the throughput ratio "
        "closer to 1.",
    ]
    if ctx.baseline:
        lines += ["", _baseline(ctx, ctx.baseline, simulator_url, redis_url, polls, scratch, counts)]
    return "\n".join(lines)


def _server_counts(
    ctx: Context, simulator_url: str, redis_url: str | None, polls: int, scratch: Path, cwd: Path = ROOT
) -> dict[str, float]:
    """Instructions per poll of the server started in cwd, per store, its files in scratch."""
    multiprocess = scratch / "metrics"
    multiprocess.mkdir(parents=True, exist_ok=True)
    # As with several workers: prometheus-client's multiprocess files, SQLite or Redis shared.
    several = {"WEB_CONCURRENCY": 1, "PROMETHEUS_MULTIPROC_DIR": multiprocess}
    stores = [("memory", "memory://", {}), ("SQLite", f"sqlite:///{scratch / 'payments.db'}", several)]
    if redis_url:
        stores.append(("Redis", redis_url, several))
    counts = {}
    for name, store_url, settings in stores:
        ctx.log(f"polling: counting instructions per poll, {name}" + ("" if cwd == ROOT else f" at {ctx.baseline}"))
        counts[name] = instructions_per_request(
            ctx,
            server_env(simulator_url, store_url, free_port(), **DASHBOARD_ON, **settings),
            "server:app",
            "/stkpush/status",
            {"checkoutRequestId": "x"},
            polls,
            prepare=lambda url: {"checkoutRequestId": completed_payment(url)},
            cwd=cwd,
        )
    return counts


def _baseline(
    ctx: Context,
    revision: str,
    simulator_url: str,
    redis_url: str | None,
    polls: int,
    scratch: Path,
    now: dict[str, float],
) -> str:
    """The server at a git revision counted as the current one was, beside it: what a change costs a poll."""
    short = revision_hash(revision) or "?"
    label = revision if short.startswith(revision) else f"{revision} ({short})"
    try:
        with checkout(ctx, revision) as tree:
            before = _server_counts(ctx, simulator_url, redis_url, polls, scratch / "callgrind-baseline", cwd=tree)
    except BenchError as error:  # the counts above still stand
        return f"**Not counted at `{label}` (`--baseline`):** {error}"
    rows = [[name, fmt(count), fmt(now[name]), f"{(now[name] - count) / count:+.1%}"] for name, count in before.items()]
    return "\n".join(
        [
            f"Against `{label}` (`--baseline`): its server code, checked out in a scratch git worktree and "
            "started from there (its own `gunicorn -c gunicorn.conf.py server:app`), counted in this run "
            "with the same Python, simulator, settings and polls as the rows above.",
            "",
            table(["store", f"at {label}", "now", "change"], rows),
            "",
            "The count's own spread is about half a percent over 1,000 polls and about one percent over "
            "`--quick`'s 300 (the same code counted twice: up to 0.8 %); a smaller change is noise.",
        ]
    )


def _deal(server, url: str, body: dict, scratch) -> tuple[LoadResult, list[float] | None, list[LoadResult]]:
    """One second of wrk, run again while it comes out lopsided (up to REDEALS times): the second
    kept, the CPU seconds each worker used in it, and the lopsided seconds run again."""
    redrawn = []
    while True:
        result, used = _second(server, url, body, scratch)
        if not _lopsided(used) or len(redrawn) == REDEALS:
            return result, used, redrawn
        redrawn.append(result)


def _lopsided(used: list[float] | None) -> bool:
    """One of several workers used LOPSIDED of their CPU time: it took every connection."""
    return used is not None and len(used) > 1 and max(used) >= LOPSIDED * sum(used)


def _second(server, url: str, body: dict, scratch) -> tuple[LoadResult, list[float] | None]:
    """One second of wrk: its result, and the CPU seconds each worker used (None if /proc did not tell)."""
    workers = gunicorn_workers(server)  # asked each time: all of them are up by now
    before = [cpu_seconds([pid]) for pid in workers]
    result = load(url, body, 1, CONNECTIONS, scratch)
    after = [cpu_seconds([pid]) for pid in workers]
    used = [end - start for start, end in zip(before, after, strict=True) if start is not None and end is not None]
    return result, (used if used and len(used) == len(workers) and result.ok else None)


def _together(runs: list[LoadResult]) -> LoadResult:
    """A round's deals as one run: polls over their seconds; latencies, the deals' median."""
    seconds, ok = sum(r.seconds for r in runs), sum(r.ok for r in runs)
    return LoadResult(
        runs[0].tool,
        seconds,
        sum(r.requests for r in runs),
        ok,
        sum(r.errors for r in runs),
        ok / seconds if seconds else 0.0,
        median(r.p50_ms for r in runs),
        median(r.p99_ms for r in runs),
    )


def _run_text(rps: float, run_again: int, serving: list[int] | None) -> str:
    """A round: '2,725 (4, 3, 5 workers; 1 run again)', the workers serving each second it kept,
    and the lopsided seconds it ran again."""
    notes = (
        [", ".join(map(str, serving)) + (" worker" if serving == [1] else " workers")] if serving is not None else []
    ) + ([f"{run_again} run again"] if run_again else [])
    return fmt(rps) + (f" ({'; '.join(notes)})" if notes else "")


def _ratio_text(ratio: float | None) -> str:
    """Two decimals, or three where two would round across the goal (0.899 is not 0.90)."""
    if ratio is not None and (round(ratio, 2) >= GOAL) != (ratio >= GOAL):
        return fmt(ratio, 3)
    return fmt(ratio, 2)


def _several_workers() -> int:
    import multiprocessing

    return multiprocessing.cpu_count() * 2 + 1  # gunicorn.conf.py's default for SQLite and Redis


def _workers_text(kind: str) -> str:
    if kind == "1 worker":
        return "1 worker × 8 threads"
    return f"{_several_workers()} workers × 8 threads"
