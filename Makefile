# `make test` and `make demo` work on a fresh machine with Python 3.11: they create the
# venv and install the project with its test extras from pyproject.toml.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: test lint demo venv clean bench bench-split systemd-analyze chromium

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# tests/core/test_systemd.py runs systemd-analyze (verify, security). Where it is missing,
# install Debian's systemd package; where it is there, this does nothing.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
systemd-analyze:
	@command -v systemd-analyze >/dev/null 2>&1 || { \
	  echo "installing Debian's systemd package (systemd-analyze, for tests/core/test_systemd.py)"; \
	  $(SUDO) apt-get update -qq && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends systemd; \
	}

# tests/core/test_status_page.py loads the status page in headless Chromium. Where it is
# missing, install Debian's chromium package; where it is there, this does nothing.
chromium:
	@[ -x /usr/bin/chromium ] || { \
	  echo "installing Debian's chromium package (headless, for tests/core/test_status_page.py)"; \
	  $(SUDO) apt-get update -qq && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium; \
	}

# Two workers: most tests wait on sockets and child processes, so the suite takes about half
# the time of one worker on 2 cores (and stays well inside its 5 minutes).
test: lint systemd-analyze chromium
	$(BIN)/pytest -n 2 --dist worksteal

# The bundled provider emulators on loopback and the daemon on rules.example.toml, live;
# alerts print as they fire (the first within seconds). Ctrl-C stops it.
demo: $(STAMP)
	@TOCSIN_HOOK_SECRET=demo-secret $(BIN)/tocsin demo -c rules.example.toml

clean:
	rm -rf $(VENV) build *.egg-info .mypy_cache .ruff_cache

# Throughput, latency, backlog and start-up against the raw floor (bench/run.py's
# docstring says what each number is); writes bench/results.json and bench/results.png.
BENCH_STAMP := $(VENV)/.bench-stamp

$(BENCH_STAMP): $(STAMP)
	$(BIN)/python -m pip install -q -e '.[test,bench]'
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	$(BIN)/python bench/run.py

# Probes, not targets: the ceiling of a daemon that receives in a second process, and the
# floor's work received through websockets' Sans-I/O layer (docs/performance.md, "What 70%
# would take").
bench-split: $(BENCH_STAMP)
	$(BIN)/python bench/split.py
