# The two quick-start commands: `make demo` and `make test`. Both set up .venv first.
.PHONY: setup demo test lint

setup:
	bash scripts/setup.sh

demo: setup
	.venv/bin/sparseflow run quickstart

test: setup
	bash scripts/ensure-postgres.sh
	bash scripts/get-helm.sh
	.venv/bin/ruff check .
	.venv/bin/python -m pytest -q

lint: setup
	.venv/bin/ruff check .
