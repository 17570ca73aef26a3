# The two commands of a fresh machine: `make start` and `make test`.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: setup start stop test test-unit test-integration lint bench clean

setup:
	@scripts/setup

start: setup
	$(VENV)/bin/binder-control start-all

stop:
	$(VENV)/bin/binder-control stop-all

test: setup lint
	scripts/test

test-unit: setup
	$(PY) -m pytest tests/unit -q

test-integration: setup
	scripts/test tests/integration

lint: setup
	$(VENV)/bin/ruff format --check control common services tests scripts/benchmarks
	$(VENV)/bin/ruff check control common services tests scripts/benchmarks
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

clean:
	rm -rf $(VENV) .node .pytest_cache .mypy_cache .ruff_cache
