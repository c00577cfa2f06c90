"""Run the benchmarks and write BENCHMARKS.md: `make bench`, or

    python -m bench.run                  every bench/bench_*.py, full length (under ~10 minutes)
    python -m bench.run --quick          fewer and shorter runs, for development
    python -m bench.run --only polling,push
    python -m bench.run --baseline main  the polling benchmark also counts the instructions per poll
                                         of the server at a git revision, beside the current code's
    python -m bench.run --output FILE    write FILE instead of BENCHMARKS.md

Each bench_<name>.py exposes run(context) -> str, its Markdown section; a module added
later is picked up by its name. Whatever a module starts is stopped when it returns,
fails or is interrupted (Ctrl-C, SIGTERM); a module that fails gets its error in the
document and the others still run.
"""

from __future__ import annotations

import argparse
import importlib
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from contextlib import suppress
from datetime import UTC, datetime
from pathlib import Path

from bench.harness import ROOT, BenchError, Context, revision_hash, table, wrk_version

BENCH_DIR = Path(__file__).resolve().parent
ORDER = ["polling", "push", "daraja_load", "memory", "peers", "profile"]


def discover() -> list[str]:
    """Benchmark names (bench_<name>.py), the known ones first in their order."""
    found = sorted(path.stem[len("bench_") :] for path in BENCH_DIR.glob("bench_*.py"))
    return [name for name in ORDER if name in found] + [name for name in found if name not in ORDER]


def machine() -> list[list[str]]:
    """The header: machine, software, date and command."""
    cpu = "unknown"
    with suppress(OSError):  # no /proc/cpuinfo: the model stays unknown
        match = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
        cpu = match.group(1).strip() if match else platform.processor() or "unknown"
    ram = "unknown"
    with suppress(OSError):  # no /proc/meminfo: the size stays unknown
        match = re.search(r"^MemTotal:\s*(\d+) kB", Path("/proc/meminfo").read_text(), re.M)
        ram = f"{int(match.group(1)) / 1024**2:.1f} GiB" if match else ram
    return [
        ["machine", f"{os.cpu_count()} cores, {cpu}, {ram} RAM"],
        ["system", f"{platform.system()} {platform.release()} ({platform.machine()})"],
        ["Python", f"{platform.python_implementation()} {platform.python_version()}"],
        [
            "stack",
            ", ".join(_versions("flask", "werkzeug", "pyuwsgi", "requests", "redis"))
            + f", wrk {wrk_version()}, {_redis_version()}",
        ],
        ["code", _code_state()],
    ]


def _versions(*names: str) -> list[str]:
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for name in names:
        try:
            out.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            out.append(f"{name} (not installed)")
    return out


def _redis_version() -> str:
    try:
        text = subprocess.run(["redis-server", "--version"], capture_output=True, text=True, timeout=5).stdout
    except (OSError, subprocess.SubprocessError):
        return "redis-server not installed"
    match = re.search(r"v=(\S+)", text)
    return f"redis-server {match.group(1)}" if match else "redis-server"


def _code_state() -> str:
    """When the measured code was committed (a date, so the document carries no commit id)."""
    try:
        head = subprocess.run(
            ["git", "log", "-1", "--format=%cs"], cwd=ROOT, capture_output=True, text=True, timeout=5
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"as committed on {head}" + (", with uncommitted changes" if dirty else "") if head else "unknown"


def command_line(argv: list[str]) -> str:
    command = "python -m bench.run" + "".join(f" {arg}" for arg in argv)
    if os.environ.get("MAKELEVEL") and not argv:
        return "`make bench` (runs `.venv/bin/python -m bench.run`)"
    return f"`{command}`"


def sanitize(text: str, workdirs: list[Path]) -> str:
    """No path of this machine in the document."""
    replacements = [(str(path), "$TMPDIR/…") for path in workdirs]
    replacements += [
        (str(ROOT), "."),
        (tempfile.gettempdir(), "$TMPDIR"),
        (sys.base_prefix, "<python>"),
        (str(Path.home()), "~"),
    ]
    for old, new in sorted(replacements, key=lambda pair: -len(pair[0])):
        if old and old not in (".", "/"):
            text = text.replace(old, new)
    return text


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    available = discover()
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer and shorter runs (for development)")
    parser.add_argument("--only", help=f"comma-separated subset of: {', '.join(available)}")
    parser.add_argument("--output", default="BENCHMARKS.md", help="where to write (default %(default)s)")
    parser.add_argument(
        "--baseline",
        metavar="REV",
        help="a git revision whose server code the polling benchmark also counts instructions per poll for, "
        "beside the current code's (checked out in a scratch git worktree)",
    )
    args = parser.parse_args(argv)
    names = available
    if args.only:
        names = [name.strip().removeprefix("bench_") for name in args.only.split(",") if name.strip()]
        unknown = [name for name in names if name not in available]
        if unknown:
            parser.error(f"unknown benchmark(s) {', '.join(unknown)}; have {', '.join(available)}")
    if args.baseline is not None:
        if "polling" not in names:
            parser.error("--baseline compares instructions per poll, which only the polling benchmark counts")
        if revision_hash(args.baseline) is None:
            parser.error(f"--baseline {args.baseline}: no such commit in this repository")

    signal.signal(signal.SIGTERM, _interrupt)
    started = time.monotonic()
    date = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    sections, summary, workdirs, timings = [], [], [], []
    for name in names:
        print(f"[bench] == {name}", file=sys.stderr, flush=True)
        began = time.monotonic()
        with Context(quick=args.quick, baseline=args.baseline) as ctx:
            workdirs.append(ctx.workdir)
            try:
                module = importlib.import_module(f"bench.bench_{name}")
                sections.append(module.run(ctx).strip())
            except KeyboardInterrupt:
                print("[bench] interrupted: stopping everything it started", file=sys.stderr, flush=True)
                raise
            except BenchError as error:
                sections.append(f"## {name}\n\n**Did not run:** {error}")
            except Exception:
                sections.append(f"## {name}\n\n**Failed:**\n\n```\n{traceback.format_exc()[-3000:]}```")
            summary += ctx.summary
        timings.append(f"{name} {time.monotonic() - began:.0f} s")
        print(f"[bench] == {name} done in {time.monotonic() - began:.0f} s", file=sys.stderr, flush=True)

    header = machine() + [
        ["date", date],
        ["command", command_line(argv)],
        [
            "mode",
            ("quick (`--quick`: fewer, shorter runs)" if args.quick else "full")
            + f"; {len(names)} benchmark(s) in {time.monotonic() - started:.0f} s ({', '.join(timings)})",
        ],
    ]
    parts = [
        "# Benchmarks",
        "",
        "Written by `make bench` (`bench/run.py`); every number is a median of several runs unless a "
        "section says otherwise, all measured in one run on the machine below, with client, server and "
        "the Daraja simulator sharing its cores. All traffic stays on 127.0.0.1.",
        "",
        table(["", ""], header),
    ]
    if summary:
        parts += ["", "## Goals at a glance", "", table(["benchmark", "goal", "result", "met"], summary)]
    parts += ["", *[section + "\n" for section in sections]]
    document = sanitize("\n".join(parts).rstrip() + "\n", workdirs)
    output = Path(args.output)
    if not output.is_absolute():
        output = ROOT / output
    output.write_text(document)
    print(f"[bench] wrote {output.name} in {time.monotonic() - started:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("[bench] interrupted; everything it started has been stopped", file=sys.stderr)
        sys.exit(130)
