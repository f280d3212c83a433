# The README's two commands: `make demo` and `make test`. Both set up .venv first.
.PHONY: setup demo test test-fast test-unit test-e2e test-slow lint docs clean

setup:
	@bash scripts/setup.sh

demo: setup
	.venv/bin/mmfuse demo

# What CI runs: the linter, then every tier (unit, e2e, slow).
test: setup lint
	.venv/bin/python -m pytest

# Unit tests and the fast end-to-end tests (minutes on 2 cores): for every change.
test-fast: setup lint
	.venv/bin/python -m pytest -m "not slow"

test-unit: setup
	.venv/bin/python -m pytest tests/unit

test-e2e: setup
	.venv/bin/python -m pytest tests/e2e -m "not slow"

test-slow: setup
	.venv/bin/python -m pytest -m slow

lint: setup
	.venv/bin/ruff check .

# Generated files: the handlers' parameter reference and the gRPC clients.
docs: setup
	.venv/bin/mmfuse config-docs
	.venv/bin/mmfuse gen-clients

clean:
	rm -rf .venv .pytest_cache build *.egg-info
