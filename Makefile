# Every target creates .venv and installs what it needs; a fresh clone needs only python3 >= 3.11.
# What users install is what is tested: `make test` builds the wheel and installs it (never editable)
# into .venv, and the suite imports mediaseal from that venv's site-packages (tests/test_installed.py
# proves it). `make dev` switches .venv to an editable install for a fast edit-and-run loop.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
PIP    := $(PY) -m pip --disable-pip-version-check
VERSION = $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
WHEEL   = dist/mediaseal-$(VERSION)-py3-none-any.whl
FOLDERS := codec plumbing keys buffer uploader agent export
# The suite's tests mostly wait (on agents, servers, producers' pauses), so four pytest-xdist workers
# on two cores take well under half the serial time (README); `make test-unit PARALLEL=` runs serially.
# loadfile: each file runs whole, in order, on one worker (module fixtures are made once, as serially).
PARALLEL ?= -n 4 --dist loadfile
SOURCES := $(shell git ls-files $(FOLDERS) 2>/dev/null) pyproject.toml setup.py README.md

.PHONY: run test test-unit test-hosts tools lint typecheck wheel install dev deb bench bench-peers soak clean

# The pinned dependency tree (and the test tools) once; mediaseal itself is (re)installed by `install`.
$(STAMP): pyproject.toml constraints.txt setup.py
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c constraints.txt '.[test]'
	touch $(STAMP)

$(WHEEL): $(SOURCES) $(STAMP)
	rm -rf build/lib build/bdist.* *.egg-info dist/mediaseal-*.whl
	$(PIP) wheel -q --no-deps -w dist . >/dev/null
	rm -rf build/lib build/bdist.* *.egg-info
	@test -f $(WHEEL) || { echo "make: the build made no $(WHEEL)"; exit 1; }

wheel: $(WHEEL)  ## dist/mediaseal-<version>-py3-none-any.whl

# The built wheel into .venv (replacing an editable install from `make dev`).
install: $(WHEEL)
	$(PIP) install -q --no-deps --force-reinstall $(WHEEL)

run: install  ## the agent on its embedded default under ./mediaseal-data/
	$(VENV)/bin/mediaseal run

test: test-unit test-hosts  ## lint, type-check, the suite against the installed wheel, then the host tiers

test-unit: install tools typecheck
	$(VENV)/bin/ruff check .
	MEDIASEAL_TEST_TARGET=wheel $(PY) -m pytest -q --ignore=tests/hosts $(PARALLEL)

# The root tiers: the container image built and run with podman, the systemd unit under a real
# systemd in systemd-nspawn, and the Debian package installed there. Each installs what it needs
# with apt-get and skips with a stated reason where it cannot (not root, no mirror).
test-hosts: install
	MEDIASEAL_TEST_TARGET=wheel $(PY) -m pytest -q -rs -p no:cacheprovider tests/hosts

# mypy sees the folders under their installed names (mediaseal.codec, ...) through a tree of links,
# so it follows the same mapping as setup.py.
typecheck: $(STAMP)
	@mkdir -p build/typecheck/mediaseal
	@for d in $(FOLDERS); do ln -sfn ../../../$$d build/typecheck/mediaseal/$$d; done
	$(VENV)/bin/mypy

# An editable install for iterating (`.venv/bin/pytest tests/test_x.py` then sees edits at once).
dev: $(STAMP)
	$(PIP) install -q --no-deps -e .

# systemd-analyze checks the systemd units (tests/test_packaging.py). Missing: installed with apt-get
# when running as root (package "systemd"; not started, only its tools are used); otherwise the tests skip.
tools:
	@command -v systemd-analyze >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "make: installing systemd-analyze (package systemd) for the unit tests"; \
	    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	      systemd; } || echo "make: could not install systemd-analyze: the unit tests will skip"; \
	  else echo "make: systemd-analyze not found: the systemd unit tests will skip (install package systemd)"; fi; }

lint: $(STAMP) typecheck
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check . || true

bench: install  ## throughput ratios against same-run baselines (see docs/BENCHMARKS.md)
	$(PY) -m pytest benchmarks -q --benchmark-enable --benchmark-only -p no:cacheprovider -s

# Optional: installs the peers (pinned, into .venv under constraints.txt; the age CLI and rclone with apt-get as root)
# only when asked, then compares them with mediaseal on the same files. Missing peers skip.
bench-peers: install  ## mediaseal vs age CLI, pyrage, tink-py, AWS Encryption SDK, gpg, rclone crypt (see docs/BENCHMARKS.md)
	sh benchmarks/peers.sh $(PY)
	$(PY) -m pytest benchmarks/test_peers.py -q --benchmark-enable --benchmark-only -p no:cacheprovider -s -rs

soak: install  ## the long crash/fault loops
	MEDIASEAL_SOAK=1 MEDIASEAL_RELIABILITY_REPORT=1 $(PY) -m pytest -q -rxs tests/test_reliability*.py tests/test_codec_fuzz.py \
	  tests/test_producers.py tests/test_ownership.py tests/test_enospc.py

clean:
	rm -rf $(VENV) build dist .pytest_cache .mypy_cache .ruff_cache .hypothesis .benchmarks

# The Debian package for premises hosts, built with Debian's own tools (dpkg-deb) around a venv made
# with Debian's python3 (packaging/debian/build-deb.sh says what goes where and why). Needs dpkg-deb and
# python3-venv; `apt install ./dist/mediaseal_<version>_amd64.deb` installs it (nothing starts until configured).
deb: $(WHEEL)  ## dist/mediaseal_<version>_<arch>.deb
	sh packaging/debian/build-deb.sh $(WHEEL) dist
