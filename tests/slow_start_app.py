"""A WSGI app that takes SLOW_START_SECONDS to build and, at exit, leaves a file named after its
process in EXITED_DIR: for stopping the Procfile's command while its workers are still starting
(`python serve.py --app tests.slow_start_app:app`)."""

import atexit
import os
import time
from pathlib import Path

time.sleep(float(os.environ["SLOW_START_SECONDS"]))
atexit.register(lambda: (Path(os.environ["EXITED_DIR"]) / str(os.getpid())).touch())


def app(environ, start_response):
    start_response("200 OK", [("Content-Type", "application/json")])
    return [b'{"status":"ok"}']
