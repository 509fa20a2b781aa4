# One command installs everything, one runs the tests (see README).
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install test test-fast proto bench bench-quick clean

install:
	bash scripts/install.sh

test:
	$(PY) -m pytest

proto:
	$(PY) -m localp2p._proto.generate

bench:
	$(PY) -m bench.run

bench-quick:
	$(PY) -m bench.run --quick

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
