# The two commands of the README. Each does its own set-up first (idempotent).
.PHONY: setup demo test lint bench
setup:
	@bash scripts/setup.sh
demo: setup
	.venv/bin/pegq demo
test: setup
	.venv/bin/python -m pytest -q
lint: setup
	.venv/bin/ruff check .
bench: setup
	.venv/bin/python benchmarks/quant_ops.py
