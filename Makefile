# Two commands matter: `make run` (the demo) and `make test` (the whole suite).
# `make shop` runs the example shop (examples/shop/) with a payment server, on free ports.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
READY  := $(VENV)/.ready

.PHONY: run shop test check bench docs services clean

$(READY): requirements.txt requirements-dev.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check -r requirements-dev.txt
	@touch $(READY)

run: $(READY)
	$(BIN)/python server.py

shop: $(READY)
	$(BIN)/python -m examples.shop

# Browser tests need Chromium and the Redis store tests a redis-server binary:
# install Debian's packages when they are missing (root, or sudo without a password).
services:
	@./scripts/ensure-packages.sh chromium redis-server

# Lint, format and type checks (the docs site is built strictly by tests/test_docs.py).
check: $(READY)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# Three test processes: most tests wait on servers and browsers, so three share two cores well.
test: $(READY) services check
	$(BIN)/python -m pytest -n 3

bench: $(READY)
	@./scripts/ensure-packages.sh wrk redis-server valgrind npm
	$(BIN)/python -m bench.run

docs: $(READY)
	$(BIN)/mkdocs serve

clean:
	rm -rf $(VENV) .pytest_cache test-artifacts site
