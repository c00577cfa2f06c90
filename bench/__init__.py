"""Benchmarks: `make bench` (or `python -m bench.run`) writes BENCHMARKS.md.

    run.py            the runner: every bench_*.py here, one Markdown section each
    harness.py        free ports, processes that always stop, the load generators
    bare_app.py       the ceiling: a bare Flask app answering like a completed status poll
    express/          the anchor: an Express server answering status polls from a Map (npm ci on first run)
    bench_polling.py  POST /stkpush/status throughput in production configuration, per store,
                      against the bare app and the Express server
    bench_push.py     1,000 STK pushes through the server and straight to the simulator
    bench_daraja_load.py  STK queries Daraja receives while 100 clients poll one payment
    bench_memory.py   bytes per record in the memory store and the time to expire them
    bench_peers.py    the same pushes through other Python Daraja clients from PyPI
    bench_profile.py  where a status poll and a push spend their time (py-spy)

A benchmark module exposes `run(context) -> str`, returning its Markdown section; the
context is a `harness.Context` (`quick`, `baseline`, `workdir`, `log()`, `start()` for processes that
are stopped when the module returns, even on failure or Ctrl-C). Everything sends traffic to
127.0.0.1 only, and every request loop is bounded in count and in time.
"""
