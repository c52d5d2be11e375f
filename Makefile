# The README's two commands.
.PHONY: demo test test-fast check bench setup

setup:
	scripts/setup

demo: setup
	.venv/bin/laion-operator demo

# The static checks first: seconds, and cheaper to fail than the suite.
test:
	scripts/setup --test
	scripts/check
	.venv/bin/python -m pytest

# ruff (lint and format), mypy, import-linter's layers.
check:
	scripts/setup
	scripts/check

# The tests that need neither Ray nor the Kubernetes test bed: minutes, for a quick look while working.
test-fast:
	scripts/setup --test
	.venv/bin/python -m pytest -m "not testbed"

bench: setup
	.venv/bin/python -m bench
