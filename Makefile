# Two commands: `make demo` (set up, then run FedCache and its baseline) and `make test` (set up, then the tests).
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.setup-stamp

.PHONY: setup setup-test system-deps system-deps-test demo test lint typecheck clean native

# `make demo` installs only what the demo needs; `make test` adds what only the tests need (see the script).
setup: system-deps $(STAMP)

setup-test: system-deps-test $(STAMP) native

system-deps:
	@bash scripts/setup-system.sh

system-deps-test:
	@bash scripts/setup-system.sh --test

$(STAMP): requirements.lock pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.lock
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

# The native device (edge_native/: C++ runtime over the executorch wheel's libraries, Paho MQTT C, SQLite);
# incremental, so quick when built. See docs/native.md.
native: system-deps $(STAMP)
	$(MAKE) -C edge_native -j2 PYTHON=$(abspath $(PY))

demo: setup
	$(PY) -m android_harness demo --out runs/demo

# Lint and type errors fail `make test` (and so CI) before the suite runs.
test: setup-test lint typecheck
	OMP_NUM_THREADS=1 $(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# Strict on the layers below the harness (fedwire, models, edge, broker_server); settings in pyproject.toml.
typecheck: $(STAMP)
	$(VENV)/bin/mypy --strict fedwire models edge broker_server

clean:
	rm -rf runs fedcache-data .pytest_cache edge_native/build
