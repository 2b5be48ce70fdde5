# `make test` and `make demo` work on a fresh machine with Python 3.11: they create the
# venv and install the project with its test extras from pyproject.toml.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: test lint demo venv clean

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

test: lint
	$(BIN)/pytest

# The bundled provider emulators on loopback and the daemon on rules.example.toml, live;
# alerts print as they fire (the first within seconds). Ctrl-C stops it.
demo: $(STAMP)
	@TOCSIN_HOOK_SECRET=demo-secret $(BIN)/tocsin demo -c rules.example.toml

clean:
	rm -rf $(VENV) build *.egg-info .mypy_cache .ruff_cache
