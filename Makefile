# Two entry points for a fresh Linux machine with Python 3.11: `make run` and `make test`.
.DEFAULT_GOAL := help
.PHONY: help run test lint typecheck pytest fmt clean

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.serve-installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e .
	touch $@

$(VENV)/.dev-installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[dev,train,bench,distributed]'
	touch $@ $(VENV)/.serve-installed

run: $(VENV)/.serve-installed  ## serve the demo model on http://127.0.0.1:8000 (serving deps only)
	$(BIN)/adscore demo

test: $(VENV)/.dev-installed lint typecheck audit pytest  ## install everything, lint, type-check, audit, run all tests

lint: $(VENV)/.dev-installed  ## ruff format check and lint
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .

typecheck: $(VENV)/.dev-installed  ## mypy --strict
	$(BIN)/mypy service models feature_client batch_scoring benchmarks tests

# OSV is asked about every installed package; without a route to it the audit says so and passes,
# any vulnerability it does find fails the build.
audit: $(VENV)/.dev-installed  ## dependency vulnerability audit (pip-audit against OSV)
	@out=$$($(BIN)/pip-audit --vulnerability-service osv --skip-editable --progress-spinner off 2>&1); \
	rc=$$?; \
	if echo "$$out" | grep -qE 'NameResolutionError|Failed to resolve|Max retries exceeded'; then \
		echo "audit: skipped, the OSV vulnerability database (api.osv.dev) is unreachable"; \
	else echo "$$out"; exit $$rc; fi

pytest: $(VENV)/.dev-installed  ## the test suite alone
	$(BIN)/pytest

fmt: $(VENV)/.dev-installed  ## format and fix what ruff can
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:  ## remove the environment and caches
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache *.egg-info
