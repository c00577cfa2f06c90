"""Against peers: the same pushes through other Python Daraja clients from PyPI.

The peers (pinned in bench/peers-requirements.txt) live in the throwaway .bench-venv/, never
in the project's venv; each run is a child process of that venv running this module's
driver (`python -m bench.bench_peers drive ...`, stdlib and the peer only), pointed at the
simulator's base URL by replacing the sandbox URL constant the library reads. Ours is
`mpesa.Daraja` itself, driven by the same driver in the project's venv. Every client gets
the same pushes (each to its own phone number), sequentially and from 50 threads, a fresh
client per run, and the simulator counts the token requests. A peer that Daraja refuses is
reported with the error it got: that is a finding, not a benchmark failure.
"""

from __future__ import annotations

import json
import re
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

KEY, SECRET = "simulator-consumer-key", "simulator-consumer-secret"
SHORTCODE = "174379"
PASSKEY = "bfb279f9aa9bdbcf158e97dd71a467cd2e0c893059b10f78e6b72ada1ed2c919"  # the public sandbox one
CALLBACK = "http://127.0.0.1:9/hooks/stk/unused"
THREADS = 50

# name -> (package==version as pinned, how it is set up); "ours" runs in the project's venv.
CLIENTS = {
    "ours": ("mpesa.Daraja (this project)", ""),
    "mpesa-sdk": (
        "mpesa-sdk",
        "token fetched once per run with `oauth_generate_token` (the library caches "
        "none); `Mpesa(token).mpesa_express_payment`, password and EAT timestamp from "
        "its helpers",
    ),
    "daraja-sdk-py": ("daraja-sdk-py", "`daraja.Mpesa({...}).stk_push`, machine time zone as installed (UTC)"),
    "daraja-sdk-py TZ=Nairobi": ("daraja-sdk-py", "the same, with `TZ=Africa/Nairobi` in its environment"),
}


def _client(name: str, base_url: str):
    """Return (push(phone) -> None, close()) for one client; errors raise."""
    if name == "ours":
        import mpesa

        daraja = mpesa.Daraja(
            base_url=base_url, consumer_key=KEY, consumer_secret=SECRET, shortcode=SHORTCODE, passkey=PASSKEY
        )

        def push(phone, amount=10):
            daraja.stk_push(phone, amount, callback_url=CALLBACK, account_reference="BENCH", description="bench")

        return push, daraja.close
    if name == "mpesa-sdk":
        import mpesa_sdk
        import mpesa_sdk.urls

        mpesa_sdk.urls.SANDBOX_BASE_URL = base_url
        body, _ = mpesa_sdk.oauth_generate_token(KEY, SECRET, env="sandbox")
        client = mpesa_sdk.Mpesa(body["access_token"], env="sandbox")

        def push(phone, amount=10):
            timestamp = mpesa_sdk.generate_timestamp()
            client.mpesa_express_payment(
                {
                    "BusinessShortCode": SHORTCODE,
                    "Timestamp": timestamp,
                    "Password": mpesa_sdk.generate_mpesa_express_password(SHORTCODE, PASSKEY, timestamp),
                    "Amount": amount,
                    "PartyA": phone,
                    "PartyB": SHORTCODE,
                    "PhoneNumber": phone,
                    "CallBackURL": CALLBACK,
                    "AccountReference": "BENCH",
                    "TransactionDesc": "bench",
                }
            )

        return push, lambda: None
    if name.startswith("daraja-sdk-py"):
        import logging

        logging.getLogger("mpesa").setLevel(logging.CRITICAL)  # it logs every refused call
        import daraja.environment

        daraja.environment.SANDBOX_BASE_URL = base_url
        from daraja import Mpesa

        client = Mpesa({"consumer_key": KEY, "consumer_secret": SECRET, "environment": "sandbox", "passkey": PASSKEY})

        def push(phone, amount=10):
            client.stk_push(
                {
                    "BusinessShortCode": int(SHORTCODE),
                    "TransactionType": "CustomerPayBillOnline",
                    "Amount": amount,
                    "PartyA": int(phone),
                    "PartyB": int(SHORTCODE),
                    "PhoneNumber": int(phone),
                    "CallBackURL": CALLBACK,
                    "AccountReference": "BENCH",
                    "TransactionDesc": "bench",
                }
            )

        return push, client._client.close
    raise ValueError(f"unknown client {name!r}")


def _error_text(error: Exception) -> str:
    """The Daraja error a client got, without the per-request ids."""
    raw = getattr(error, "raw_response", None) or ""
    match = re.search(r'"errorCode"\s*:\s*"([^"]+)".*?"errorMessage"\s*:\s*"([^"]+)"', str(raw))
    if match:
        return f"{type(error).__name__}: {match.group(1)} {match.group(2)}"
    return f"{type(error).__name__}: {str(error).splitlines()[0][:160]}" if str(error) else type(error).__name__


def drive(name: str, base_url: str, phones: list[str], threads: int, deadline: float = 120.0) -> dict:
    """Push to every phone from `threads` threads (1 = sequentially); bounded by `deadline` s."""
    began = time.perf_counter()
    stop_at = time.monotonic() + deadline
    push, close = _client(name, base_url)
    latencies, errors = [], {}
    lock = threading.Lock()

    def one(phone):
        if time.monotonic() > stop_at:
            return
        started = time.perf_counter()
        try:
            push(phone)
        except Exception as error:  # a peer's own exception types
            with lock:
                key = _error_text(error)
                errors[key] = errors.get(key, 0) + 1
            return
        with lock:
            latencies.append((time.perf_counter() - started) * 1000)

    try:
        if threads == 1:
            for phone in phones:
                one(phone)
        else:
            with ThreadPoolExecutor(max_workers=threads) as pool:
                list(pool.map(one, phones))
    finally:
        close()
    latencies.sort()
    return {
        "wall": time.perf_counter() - began,
        "ok": len(latencies),
        "errors": errors,
        "p50": statistics.median(latencies) if latencies else None,
        "p99": latencies[int(0.99 * (len(latencies) - 1))] if latencies else None,
    }


def retry_probe(name: str, base_url: str, phone: str) -> str:
    """Push twice to one phone (another amount): the second is refused (500, "Unable to lock subscriber")."""
    push, close = _client(name, base_url)
    try:
        push(phone)
        try:
            push(phone, 11)
        except Exception as error:
            return _error_text(error)
        return "accepted"
    finally:
        close()


def _main(argv: list[str]) -> None:
    command, name, base_url = argv[0], argv[1], argv[2]
    if command == "drive":
        threads, phones = int(argv[3]), argv[4].split(",")
        print(json.dumps(drive(name, base_url, phones, threads)))
    elif command == "probe":
        print(json.dumps({"error": retry_probe(name, base_url, argv[3])}))


def run(ctx) -> str:
    from bench.harness import (
        PYTHON,
        ROOT,
        base_env,
        bench_venv_python,
        closes_connections,
        fmt,
        median,
        simulator_reset,
        simulator_stats,
        start_simulator,
        table,
    )

    pushes = 200 if ctx.quick else 1000
    rounds = ctx.runs(3, 1)
    venv_python = bench_venv_python(ctx)
    pins = _pins(ROOT / "bench" / "peers-requirements.txt")
    sim = start_simulator(ctx)
    block = [10]

    def phones():
        block[0] += 1
        return [f"2547{block[0]:02d}{i:06d}" for i in range(pushes)]

    def child(name: str, args: list[str]) -> dict:
        env = base_env()
        if name.endswith("TZ=Nairobi"):
            env["TZ"] = "Africa/Nairobi"
        python = PYTHON if name == "ours" else str(venv_python)
        done = subprocess.run(
            [python, "-m", "bench.bench_peers", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
        )
        if done.returncode != 0:
            return {"crash": (done.stderr.strip().splitlines() or ["no output"])[-1][:300]}
        return json.loads(done.stdout.strip().splitlines()[-1])

    results: dict = {(name, mode): [] for name in CLIENTS for mode in ("sequential", f"{THREADS} threads")}
    for number in range(rounds):  # interleaved, so drift on the machine hits every client alike
        for name in CLIENTS:
            for mode, threads in (("sequential", 1), (f"{THREADS} threads", THREADS)):
                earlier = results[(name, mode)]
                if earlier and (earlier[0].get("crash") or not earlier[0].get("ok")):
                    continue  # refused or broken: one run says it all
                simulator_reset(sim.url)
                ctx.log(f"peers: {name}, {mode}, run {number + 1}/{rounds}")
                result = child(name, ["drive", name, sim.url, str(threads), ",".join(phones())])
                result["tokens"] = simulator_stats(sim.url)["tokens_issued"]
                earlier.append(result)

    probes = {}
    for name in CLIENTS:
        if name == "daraja-sdk-py":
            continue  # refused before it could push at all
        simulator_reset(sim.url)
        ctx.log(f"peers: {name}, a push Daraja refuses with HTTP 500")
        answer = child(name, ["probe", name, sim.url, f"2547{block[0] + 1:02d}000001"])
        stats = simulator_stats(sim.url)
        probes[name] = (
            answer.get("error") or answer.get("crash"),
            stats["pushes_accepted"] + stats["pushes_rejected"] - 1,
        )

    rows = []
    for (name, mode), runs in results.items():
        label = name if name == "ours" else f"{CLIENTS[name][0]} {pins.get(CLIENTS[name][0], '')}".strip()
        if name.endswith("TZ=Nairobi"):
            label += " with TZ=Africa/Nairobi"
        crash = next((r["crash"] for r in runs if r.get("crash")), None)
        if crash:
            rows.append([label, mode, "—", "—", "—", "—", "0", "—", f"**could not run:** {crash}"])
            continue
        ok = [r for r in runs if r.get("ok")]
        errors = {}
        for r in runs:
            for text, count in r["errors"].items():
                errors[text] = errors.get(text, 0) + count
        problem = "; ".join(f"{count:,} × {text}" for text, count in errors.items())
        if not ok:
            rows.append(
                [
                    label,
                    mode,
                    f"{median(r['wall'] for r in runs):.2f} s",
                    "—",
                    "—",
                    "—",
                    f"0 / {pushes:,}",
                    ", ".join(str(r["tokens"]) for r in runs),
                    f"**refused by Daraja:** {problem}",
                ]
            )
            continue
        rows.append(
            [
                label,
                mode,
                f"{median(r['wall'] for r in ok):.2f} s",
                fmt(median(r["ok"] / r["wall"] for r in ok)),
                fmt(median(r["p50"] for r in ok), 1),
                fmt(median(r["p99"] for r in ok), 1),
                f"{sum(r['ok'] for r in runs):,} / {pushes * len(runs):,}",
                ", ".join(str(r["tokens"]) for r in runs),
                problem or "—",
            ]
        )

    django = _django_daraja(venv_python, ROOT, base_env())
    rows.append(
        [f"django-daraja {pins.get('django-daraja', '')}", "—", "—", "—", "—", "—", "—", "—", f"**not run:** {django}"]
    )

    ours = median(r["wall"] for r in results.get(("ours", f"{THREADS} threads"), []) if r.get("ok"))
    theirs = {
        name: median(r["wall"] for r in results.get((name, f"{THREADS} threads"), []) if r.get("ok"))
        for name in CLIENTS
        if name != "ours"
    }
    comparisons = [f"{name}: {wall / ours:.1f}× our wall time" for name, wall in theirs.items() if wall and ours]
    lines = [
        "## 5. Against other Python Daraja clients",
        "",
        f"{pushes:,} STK pushes to the simulator (its own process), each to its own phone number, "
        f"sequentially and from {THREADS} threads sharing one client; a fresh client per run, median of "
        f"{rounds} run(s) (a refused client: one run). Peers run in `.bench-venv/` (pinned in "
        "`bench/peers-requirements.txt`), pointed at the simulator by replacing the sandbox base-URL "
        "constant they read. Wall time includes creating the client and getting its token.",
        "",
        table(
            [
                "client",
                "mode",
                "wall time",
                "pushes/s",
                "p50 ms",
                "p99 ms",
                "accepted",
                "token requests per run",
                "notes",
            ],
            rows,
        ),
        "",
        "How each was driven: " + "; ".join(f"**{name}**: {how}" for name, (_, how) in CLIENTS.items() if how) + ".",
    ]
    if comparisons:
        lines += ["", f"With {THREADS} threads, " + "; ".join(comparisons) + "."]
    if closes_connections(sim.url + "/simulator/health"):
        lines += [
            "",
            "The simulator (werkzeug's server) answers `Connection: close`, so every client opens a "
            "connection per push and pooling cannot show here; against Daraja over TLS, a client "
            "without a pooled session (mpesa-sdk calls `requests.request` each time) would also pay "
            "a TLS handshake per push.",
        ]
    if probes:
        lines += [
            "",
            "A push Daraja refuses with HTTP 500 (`500.001.1001 Unable to lock subscriber`: a second "
            "push to a phone whose prompt is open): what the client raised, and how many push requests "
            "Daraja received for that one call:",
            "",
            table(
                ["client", "error raised", "push requests sent"],
                [[name, text, count] for name, (text, count) in probes.items()],
            ),
        ]
    return "\n".join(lines)


def _pins(path) -> dict:
    pins = {}
    for line in path.read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9_.-]+)==(\S+)", line.strip())
        if match:
            pins[match.group(1)] = match.group(2)
    return pins


def _django_daraja(python, root, env) -> str:
    """django-daraja runs only inside a configured Django project; say what importing it does."""
    done = subprocess.run(
        [str(python), "-c", "import django_daraja.mpesa.core"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    if done.returncode == 0:
        return "imports without a Django project, but keeps its token in a Django model (needs a database)"
    last = (done.stderr.strip().splitlines() or ["?"])[-1]
    return (
        "needs a Django project (settings and a database table for its token); importing it outside "
        f"one fails with `{last.split(':')[0]}`"
    )


if __name__ == "__main__":
    _main(sys.argv[1:])
