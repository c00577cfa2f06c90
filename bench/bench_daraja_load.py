"""Daraja load: what 100 clients polling one pending payment cost Daraja.

Each client polls `POST /stkpush/status` every 100 ms for 10 s (a missed tick is skipped,
not caught up) with STATUS_FIRST_QUERY_AFTER=0, so every poll is allowed to ask Daraja; the
throttle (one STK Query per payment per STATUS_QUERY_INTERVAL, an atomic add in the store,
shared by every worker) must keep Daraja's load at one query per interval: at most 3 in 10 s.
The simulator counts the queries it received (`GET /simulator/stats` → `queries`).
"""

from __future__ import annotations

import math
import multiprocessing
import threading
import time

import requests

from bench.harness import (
    BenchError,
    Context,
    fmt,
    free_port,
    percentile,
    server_env,
    simulator_stats,
    start_server,
    start_simulator,
    store_urls,
    table,
)

CLIENTS = 100
INTERVAL = 0.1
QUERY_INTERVAL = 5.0


def run(ctx: Context) -> str:
    seconds = 10.0
    goal = math.floor(seconds / QUERY_INTERVAL) + 1
    sim = start_simulator(ctx)
    stores, redis_missing = store_urls(ctx, "daraja-load")

    rows = []
    for number, (name, url) in enumerate(stores):
        env = server_env(sim.url, url, free_port(), STATUS_FIRST_QUERY_AFTER=0, STATUS_QUERY_INTERVAL=QUERY_INTERVAL)
        server = start_server(ctx, env, name=f"server-{name}")
        answer = requests.post(
            server.url + "/stkpush", json={"phone": f"25479900{number:04d}", "amount": 10}, timeout=30
        )
        if answer.status_code != 200:
            raise BenchError(f"{name}: push failed: {answer.status_code} {answer.text[:200]}")
        body = {"checkoutRequestId": answer.json()["checkoutRequestId"]}
        before = simulator_stats(sim.url)["queries"]
        ctx.log(f"daraja load: {CLIENTS} clients polling for {seconds:.0f} s, {name} store")
        polls = poll(server.url + "/stkpush/status", body, CLIENTS, INTERVAL, seconds)
        queries = simulator_stats(sim.url)["queries"] - before
        ctx.stop(server)
        met = queries <= goal
        workers = "1 worker" if name == "memory" else f"{multiprocessing.cpu_count() * 2 + 1} workers"
        rows.append(
            [
                f"{name} ({workers})",
                f"{polls['sent']:,}",
                f"{polls['sent'] / seconds:,.0f}",
                f"{polls['pending']:,}",
                f"{polls['other']:,}",
                fmt(polls["p50"], 1),
                fmt(polls["p99"], 1),
                f"**{queries}**",
                "yes" if met else "**no**",
            ]
        )
        ctx.summary.append(
            [
                f"Daraja load, {name} store: STK queries while {CLIENTS} clients poll for {seconds:.0f} s",
                f"≤ {goal}",
                str(queries),
                "yes" if met else "**no**",
            ]
        )
    if redis_missing and not ctx.quick:
        rows.append(["Redis", "**skipped**", "", "", "", "", "", "", redis_missing])
    return "\n".join(
        [
            "## 3. Daraja load",
            "",
            f"{CLIENTS} clients (threads, one pooled session each) poll one pending payment every "
            f"{INTERVAL * 1000:.0f} ms for {seconds:.0f} s through the server (the Procfile's command, "
            f"`STATUS_FIRST_QUERY_AFTER=0`, `STATUS_QUERY_INTERVAL={QUERY_INTERVAL:.0f}`); one run per store. "
            f"The clients ask for {CLIENTS / INTERVAL * seconds:,.0f} polls; on 2 shared cores fewer are "
            "answered, which only makes the throttle's job easier per poll, not per second.",
            "",
            table(
                [
                    "store",
                    "polls answered",
                    "polls/s",
                    "answered pending",
                    "other answers",
                    "p50 ms",
                    "p99 ms",
                    "STK queries Daraja received",
                    f"≤ {goal}",
                ],
                rows,
            ),
            "",
            f"Goal: at most one STK Query per `STATUS_QUERY_INTERVAL` per payment: ≤ {goal} in {seconds:.0f} s "
            "(t = 0, 5, 10 s), whatever the number of clients and workers.",
        ]
    )


def poll(url: str, body: dict, clients: int, interval: float, seconds: float) -> dict:
    """`clients` threads POST body every `interval` s for `seconds` s; bounded in count and time."""
    start = time.monotonic() + 0.2
    end = start + seconds
    ticks = int(seconds / interval)
    lock = threading.Lock()
    latencies: list[float] = []
    counts = {"sent": 0, "pending": 0, "other": 0}

    def client(offset: float):
        session = requests.Session()
        mine, statuses = [], {"sent": 0, "pending": 0, "other": 0}
        tick = 0
        try:
            while tick < ticks:
                due = start + offset + tick * interval
                now = time.monotonic()
                if due >= end:
                    break
                if due > now:
                    time.sleep(due - now)
                began = time.perf_counter()
                try:
                    answer = session.post(url, json=body, timeout=10)
                    pending = answer.status_code == 200 and answer.json().get("status") == "pending"
                except (requests.RequestException, ValueError):
                    pending = False
                mine.append((time.perf_counter() - began) * 1000)
                statuses["sent"] += 1
                statuses["pending" if pending else "other"] += 1
                # Skip the ticks missed while waiting, rather than bursting to catch up.
                tick = max(tick + 1, math.ceil((time.monotonic() - start - offset) / interval))
        finally:
            session.close()
        with lock:
            latencies.extend(mine)
            for key, value in statuses.items():
                counts[key] += value

    threads = [threading.Thread(target=client, args=(interval * i / clients,), daemon=True) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=seconds + 30)
    return {**counts, "p50": percentile(latencies, 50), "p99": percentile(latencies, 99)}
