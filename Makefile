# The README's two commands.
.PHONY: demo test bench setup

setup:
	scripts/setup

demo: setup
	.venv/bin/laion-operator demo

test:
	scripts/setup --test
	.venv/bin/python -m pytest

bench: setup
	.venv/bin/python -m bench
