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

.PHONY: venv run test lint clean reports demo-data browser-deps

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/python -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
		{ echo "Python >= 3.11 is required ($(PYTHON) is too old); set PYTHON=..."; exit 1; }
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	@touch $@

# RUN_ARGS=--demo (default) creates a demo campaign, generates 100,000 codes and redeems some,
# then the reporting demo data; `up` also starts the reporting app (--no-reports: not).
RUN_ARGS ?= --demo
run: venv
	$(BIN)/voucher-engine up $(RUN_ARGS)

# The reporting app alone, against a running API (VOUCHER_HTTP_HOST/PORT, or API_URL=...).
reports: venv
	$(BIN)/voucher-engine reports $(if $(API_URL),--api-url $(API_URL))

# Demo campaigns with two weeks of history, on the engine `make run` started (additive).
demo-data: venv
	$(BIN)/voucher-engine demo-data

# The browser test drives Debian's chromium (never a downloaded browser). Install it when it
# is missing and we may (root on Debian); elsewhere the test skips and says why (CI fails).
browser-deps:
	@if ! command -v chromium >/dev/null 2>&1; then \
		if [ "$$(id -u)" = 0 ] && [ -f /etc/debian_version ]; then \
			echo "browser-deps: installing Debian's chromium for the browser test"; \
			apt-get update -qq >/dev/null && \
			DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
		else \
			echo "browser-deps: chromium missing and not installable here (needs root on Debian)"; \
		fi; \
	fi

lint: venv
	$(BIN)/ruff check .
	$(BIN)/mypy engine store actors serve ops

test: lint browser-deps
	$(BIN)/pytest -q tests/unit
	$(TIMEOUT) $(BIN)/pytest -q $(PYTEST_SLOW_OPTS) tests/integration tests/fault

clean:
	rm -rf .data
