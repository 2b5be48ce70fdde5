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

# Until the provider plugins land: a dry run of rules.example.toml over sample events.
demo: $(STAMP)
	@TOCSIN_HOOK_SECRET=demo-secret $(BIN)/tocsin check -c rules.example.toml
	@TOCSIN_HOOK_SECRET=demo-secret $(BIN)/tocsin test -c rules.example.toml examples/events.jsonl

clean:
	rm -rf $(VENV) build *.egg-info .mypy_cache .ruff_cache
