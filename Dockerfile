# The payment server as the Procfile runs it: `python serve.py`, uWSGI on $PORT.
# No setting is baked in (.dockerignore keeps .env out): pass them at run time, e.g.
#   docker run --env-file .env -p 3001:3001 IMAGE
# With none, the server runs its Daraja simulator demo.
FROM python:3.11-slim

# PROMETHEUS_MULTIPROC_DIR: where the workers add up their metrics, set before anything
# imports prometheus-client (the Procfile makes a fresh one; a container is one server).
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PORT=3001 \
    PROMETHEUS_MULTIPROC_DIR=/tmp/mpesa-metrics

WORKDIR /app

# The server runs as this user; the code stays root's. /data is where a
# STORE_URL=sqlite:////data/payments.db lives (mount a volume there).
RUN useradd --no-log-init --create-home --uid 10001 --user-group app \
    && mkdir /data \
    && chown app:app /data

# Only the runtime dependencies (not requirements-dev.txt), in their own layer.
COPY requirements.txt .
RUN pip install --no-cache-dir -r requirements.txt

COPY . .

# Numeric, so that a runtime can tell it is not root (runAsNonRoot); 10001 is "app".
USER 10001:10001
EXPOSE 3001

# Python, since the slim image has no curl; fails on a refused connection or a non-2xx answer.
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('PORT', '3001'), timeout=4)"]

CMD ["python", "serve.py"]
