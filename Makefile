# fleece: `make demo` and `make test` work on a fresh Debian 12 with Python 3.11.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.fleece-installed
PYTEST := $(PY) -m pytest
# Debian's nbdsh imports Debian's Python: keep /usr/bin ahead of the venv for the peers.
PEER_PATH := /usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

SOURCES := pyproject.toml setup.py $(wildcard fleece/_fast/*.pyx fleece/_fast/*.pxd)

.PHONY: demo test unit unit-pure rest rest-pure interop lint bench venv peers clean

demo: $(STAMP)
	$(PY) -m fleece demo

test: $(STAMP) peers
	$(MAKE) --no-print-directory lint unit unit-pure rest rest-pure

venv: $(STAMP)

$(STAMP): $(SOURCES)
	sh scripts/install-peers.sh build
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,dev,bench]'
	touch $(STAMP)

peers:
	sh scripts/install-peers.sh peers

lint: $(STAMP)
	$(PY) -m ruff check fleece tests benchmarks examples
	$(PY) -m mypy

# The unit tests run twice: on the compiled extensions, then on the pure-Python twins.
unit: $(STAMP)
	$(PYTEST) -q tests/unit

unit-pure: $(STAMP)
	FLEECE_NO_EXTENSIONS=1 $(PYTEST) -q tests/unit

# Everything else: interop with the real peers (which must be installed: missing is a failure).
rest: $(STAMP)
	PATH="$(PEER_PATH):$(CURDIR)/$(VENV)/bin" $(PYTEST) -q tests --ignore=tests/unit

# The interop tests whose peers talk NBD to fleece's server (in process or `fleece daemon`)
# again on the pure-Python path: it stays the fallback and the oracle of the native data plane
# (issue 14). About 45 s on 2 cores.
NBD_INTEROP := $(addprefix tests/interop/,test_nbd_interop.py test_nbd_tls.py \
	test_snapshot_map.py test_daemon_cli.py test_bitmaps_interop.py test_push_backup.py \
	test_examples.py)

rest-pure: $(STAMP)
	FLEECE_NO_EXTENSIONS=1 PATH="$(PEER_PATH):$(CURDIR)/$(VENV)/bin" $(PYTEST) -q $(NBD_INTEROP)

bench: $(STAMP)
	$(PYTEST) benchmarks --benchmark-only --benchmark-group-by=group --benchmark-columns=min,mean,median,max,rounds

clean:
	rm -rf build $(VENV) fleece/_fast/*.c fleece/_fast/*.so .pytest_cache .mypy_cache .ruff_cache
