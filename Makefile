# One-command setup: every target that needs Python depends on the venv stamp, which is
# rebuilt only when pyproject.toml changes.

PYTHON ?= $(shell command -v python3.11 2>/dev/null || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

# Hard ceiling for the integration and fault suites; faulthandler dumps every thread's
# stack when a single test hangs, so a stuck test explains itself before the ceiling hits.
TEST_TIMEOUT ?= 1800
TIMEOUT := $(shell command -v timeout >/dev/null 2>&1 && echo "timeout -k 30 $(TEST_TIMEOUT)")
PYTEST_SLOW_OPTS ?= -o faulthandler_timeout=300 --durations=10

.PHONY: venv run test lint clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/python -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
		{ echo "Python >= 3.11 is required ($(PYTHON) is too old); set PYTHON=..."; exit 1; }
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	@touch $@

# RUN_ARGS=--demo (default) creates a demo campaign, generates 100,000 codes and redeems some.
RUN_ARGS ?= --demo
run: venv
	$(BIN)/voucher-engine up $(RUN_ARGS)

lint: venv
	$(BIN)/ruff check .
	$(BIN)/mypy engine actors

test: lint
	$(BIN)/pytest -q tests/unit
	$(TIMEOUT) $(BIN)/pytest -q $(PYTEST_SLOW_OPTS) tests/integration tests/fault

clean:
	rm -rf .data
