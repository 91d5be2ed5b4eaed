# Set-up on a fresh machine is part of each target: `make demo` and `make test` are all a
# user needs. torch is pinned and installed first (a bare requirement pulls a CUDA build).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
TORCH  ?= torch==2.13.0
# Test sessions run side by side: the e2e and fault tests mostly wait on worker processes.
TEST_WORKERS ?= 2

.PHONY: demo test lint install clean

$(BIN)/lcmq: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(BIN)/lcmq

install: $(BIN)/lcmq

# The embedded default: SQLite, a filesystem broker and ./renders/ — no servers needed.
demo: install
	env -u LCMQ_DATABASE_URL -u LCMQ_BROKER_URL -u LCMQ_STORAGE_URL $(BIN)/lcmq demo

# Lint first: it takes seconds, the suite minutes.
lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: lint
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS)

clean:
	rm -rf .lcmq renders
