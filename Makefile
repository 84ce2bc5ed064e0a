# Every target creates .venv and installs what it needs; a fresh clone needs only python3 >= 3.11.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: run test lint bench bench-peers soak clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[test]'
	touch $(STAMP)

run: $(STAMP)  ## the agent on its embedded default under ./mediaseal-data/
	$(VENV)/bin/mediaseal run

test: $(STAMP)  ## lint, type-check, then the whole suite
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check . || true
	$(VENV)/bin/mypy

bench: $(STAMP)  ## throughput ratios against same-run baselines (see docs/BENCHMARKS.md)
	$(PY) -m pytest benchmarks -q --benchmark-enable --benchmark-only -p no:cacheprovider -s

soak: $(STAMP)  ## the long crash/fault loops
	MEDIASEAL_SOAK=1 $(PY) -m pytest -q -m slow tests

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis .benchmarks
