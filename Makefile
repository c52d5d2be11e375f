# The README's two commands.
.PHONY: demo test test-fast bench setup

setup:
	scripts/setup

demo: setup
	.venv/bin/laion-operator demo

test:
	scripts/setup --test
	.venv/bin/python -m pytest

# The tests that need neither Ray nor the Kubernetes test bed: minutes, for a quick look while working.
test-fast:
	scripts/setup --test
	.venv/bin/python -m pytest -m "not testbed"

bench: setup
	.venv/bin/python -m bench
