# The two commands of the README: `make demo` and `make test`. Both set up .venv first.
.PHONY: setup demo test test-unit test-e2e clean

setup:
	@bash scripts/setup.sh

demo: setup
	.venv/bin/mmfuse demo

test: setup
	.venv/bin/python -m pytest

test-unit: setup
	.venv/bin/python -m pytest tests/unit

test-e2e: setup
	.venv/bin/python -m pytest tests/e2e

clean:
	rm -rf .venv .pytest_cache
