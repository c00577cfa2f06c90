"""The push path: 1,000 STK pushes from 50 threads, through the server and straight to Daraja.

The simulator runs as its own process (`python -m simulator --port N`) with prompts that stay
open for an hour, so no callback lands during a run and every push uses its own phone number
(no "Unable to lock subscriber"). The same client code (harness.post_batch: a thread pool,
one pooled session per thread) sends `POST /stkpush` to the server, and the equivalent Daraja
request (token fetched once, password built once per run) straight to the simulator; the
difference in latency is what the server adds. Runs alternate between the two paths.
"""

from __future__ import annotations

import multiprocessing

import requests

import mpesa
from bench.harness import (
    LOCAL,
    SIM_KEY,
    SIM_SECRET,
    BenchError,
    Context,
    closes_connections,
    fmt,
    free_port,
    median,
    percentile,
    post_batch,
    server_env,
    simulator_reset,
    simulator_stats,
    start_server,
    start_simulator,
    store_urls,
    table,
)

THREADS = 50


def run(ctx: Context) -> str:
    pushes = 200 if ctx.quick else 1000
    rounds = ctx.runs(3, 1)
    sim = start_simulator(ctx)
    stores, redis_missing = store_urls(ctx, "push")

    servers = {}
    for name, url in stores:
        servers[name] = start_server(ctx, server_env(sim.url, url, free_port()), name=f"server-{name}")
    token = requests.get(
        sim.url + "/oauth/v1/generate",
        params={"grant_type": "client_credentials"},
        auth=(SIM_KEY, SIM_SECRET),
        timeout=10,
    ).json()["access_token"]

    batches: dict[str, list] = {name: [] for name in [*servers, "direct"]}
    tokens = {name: 0 for name in servers}
    failures: list[str] = []
    phone_block = 0
    for round_number in range(rounds):
        for name in [*servers, "direct"]:
            phone_block += 1
            phones = [f"2547{phone_block:02d}{i:06d}" for i in range(pushes)]
            if name == "direct":
                jobs = _daraja_jobs(sim.url, token, phones)
            else:
                jobs = [
                    (
                        servers[name].url + "/stkpush",
                        {"phone": phone, "amount": 10, "accountReference": "BENCH", "description": "bench"},
                        {},
                    )
                    for phone in phones
                ]
            simulator_reset(sim.url)
            ctx.log(f"push: round {round_number + 1}/{rounds}: {pushes} pushes, {name}")
            batch = post_batch(jobs, THREADS, deadline_seconds=120)
            batches[name].append(batch)
            if name != "direct":
                tokens[name] += simulator_stats(sim.url)["tokens_issued"]
            failures += [f"{name}: {failure}" for failure in batch.failures[:3]]

    direct = _summary(batches["direct"])
    rows = []
    for name in servers:
        ours = _summary(batches[name])
        workers = "1 worker" if name == "memory" else f"{multiprocessing.cpu_count() * 2 + 1} workers"
        rows.append(
            [
                f"through the server ({name} store, {workers} × 8 threads)",
                fmt(ours["rate"]),
                fmt(ours["p50"], 1),
                fmt(ours["p99"], 1),
                f"+{fmt(ours['p50'] - direct['p50'], 1)} / +{fmt(ours['p99'] - direct['p99'], 1)}",
                ours["ok"],
                f"**{tokens[name]}**",
            ]
        )
        ctx.summary.append(
            [
                f"push path, {name} store: token requests for {rounds * pushes:,} pushes",
                "1",
                str(tokens[name]),
                "yes" if tokens[name] == 1 else "**no**",
            ]
        )
    rows.append(
        [
            "straight to the simulator (same client code)",
            fmt(direct["rate"]),
            fmt(direct["p50"], 1),
            fmt(direct["p99"], 1),
            "—",
            direct["ok"],
            "1 (fetched once)",
        ]
    )
    lines = [
        "## 2. Push path",
        "",
        f"{pushes:,} STK pushes from {THREADS} threads (one pooled `requests` session each), every push "
        f"to its own phone number, median of {rounds} run(s) per path; servers under the Procfile's "
        "command (uWSGI), rate limits off, Daraja = the simulator in its own process. "
        "Latency is what the client measures for one request.",
        "",
        table(
            [
                "path",
                "pushes/s",
                "p50 ms",
                "p99 ms",
                "server adds p50 / p99 ms",
                "accepted (all runs)",
                "token requests (all runs)",
            ],
            rows,
        ),
        "",
        "Goal for token requests: 1 per server, however many threads and workers push at a cold start "
        "(counted by the simulator, `GET /simulator/stats` → `tokens_issued`, over every run).",
    ]
    if closes_connections(sim.url + "/simulator/health"):
        lines += [
            "",
            "The simulator answers `Connection: close`: the server's pooled Daraja session opens a "
            "connection per push here, as the direct client does.",
        ]
    if redis_missing and not ctx.quick:
        lines += ["", f"**Redis skipped:** {redis_missing}."]
    if failures:
        lines += ["", "Refused or failed pushes (first few): " + "; ".join(sorted(set(failures))[:6])]
    return "\n".join(lines)


def _daraja_jobs(simulator_url: str, token: str, phones: list[str]) -> list:
    timestamp = mpesa.daraja_timestamp()
    password = mpesa.stk_password(mpesa.SANDBOX_SHORTCODE, mpesa.SANDBOX_PASSKEY, timestamp)
    headers = {"Authorization": f"Bearer {token}"}
    url = simulator_url + "/mpesa/stkpush/v1/processrequest"
    callback = f"http://{LOCAL}:9/hooks/stk/unused"
    return [
        (
            url,
            {
                "BusinessShortCode": mpesa.SANDBOX_SHORTCODE,
                "Password": password,
                "Timestamp": timestamp,
                "TransactionType": "CustomerPayBillOnline",
                "Amount": 10,
                "PartyA": phone,
                "PartyB": mpesa.SANDBOX_SHORTCODE,
                "PhoneNumber": phone,
                "CallBackURL": callback,
                "AccountReference": "BENCH",
                "TransactionDesc": "bench",
            },
            headers,
        )
        for phone in phones
    ]


def _summary(batches: list) -> dict:
    if not batches:
        raise BenchError("no runs")
    return {
        "rate": median(b.rate for b in batches),
        "p50": median(percentile(b.latencies_ms, 50) for b in batches),
        "p99": median(percentile(b.latencies_ms, 99) for b in batches),
        "ok": f"{sum(b.ok for b in batches):,} / {sum(len(b.latencies_ms) + len(b.failures) for b in batches):,}",
    }
