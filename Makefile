# Every target creates .venv and installs what it needs; a fresh clone needs only python3 >= 3.11.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: run test tools lint bench bench-peers soak clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[test]'
	touch $(STAMP)

run: $(STAMP)  ## the agent on its embedded default under ./mediaseal-data/
	$(VENV)/bin/mediaseal run

test: $(STAMP) tools  ## lint, type-check, then the whole suite
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	$(PY) -m pytest -q

# systemd-analyze checks the systemd units (tests/test_packaging.py). Missing: installed with apt-get
# when running as root (package "systemd"; not started, only its tools are used); otherwise the tests skip.
tools:
	@command -v systemd-analyze >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "make: installing systemd-analyze (package systemd) for the unit tests"; \
	    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	      systemd; } || echo "make: could not install systemd-analyze: the unit tests will skip"; \
	  else echo "make: systemd-analyze not found: the systemd unit tests will skip (install package systemd)"; fi; }

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check . || true
	$(VENV)/bin/mypy

bench: $(STAMP)  ## throughput ratios against same-run baselines (see docs/BENCHMARKS.md)
	$(PY) -m pytest benchmarks -q --benchmark-enable --benchmark-only -p no:cacheprovider -s

# Optional: installs the peers (pinned, into .venv under constraints.txt; the age CLI and rclone with apt-get as root)
# only when asked, then compares them with mediaseal on the same files. Missing peers skip.
bench-peers: $(STAMP)  ## mediaseal vs age CLI, pyrage, tink-py, AWS Encryption SDK, gpg, rclone crypt (see docs/BENCHMARKS.md)
	sh benchmarks/peers.sh $(PY)
	$(PY) -m pytest benchmarks/test_peers.py -q --benchmark-enable --benchmark-only -p no:cacheprovider -s -rs

soak: $(STAMP)  ## the long crash/fault loops
	MEDIASEAL_SOAK=1 MEDIASEAL_RELIABILITY_REPORT=1 $(PY) -m pytest -q -rxs tests/test_reliability*.py tests/test_codec_fuzz.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis .benchmarks
