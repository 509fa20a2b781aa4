# One command installs everything, one runs the tests (see README).
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install test test-unit test-gpu lint proto bench bench-quick clean

install:
	bash scripts/install.sh

# The whole suite, after the linters: real llama.cpp, rpc-servers, processes, HTTP.
test: lint
	$(PY) -m pytest

# The pure-logic unit tests alone (seconds): layers, worker set, failover, admission, ...
test-unit:
	$(PY) -m pytest -q tests/test_unit_*.py

# llama.cpp's Vulkan backend on Mesa's software driver (lavapipe), no GPU needed: builds the
# Vulkan llama-cpp-python once (~30 min on 2 cores, cached) into .venv-vulkan, then checks a
# worker on it reports the Vulkan device and answers as the CPU does (see README "GPUs").
test-gpu:
	VENV=$(VENV) bash scripts/test-gpu.sh

# ruff (rules in pyproject.toml) and mypy on localp2p/ and backends/. mypy reads trio's own
# types through .mypy-path (py-libp2p installs old trio stubs that would shadow them).
lint:
	$(VENV)/bin/ruff check localp2p backends bench tests examples
	mkdir -p .mypy-path && ln -sfn "$$($(PY) -c 'import pathlib, trio; print(pathlib.Path(trio.__file__).parent)')" .mypy-path/trio
	$(VENV)/bin/mypy

proto:
	$(PY) -m localp2p._proto.generate

bench:
	$(PY) -m bench.run

bench-quick:
	$(PY) -m bench.run --quick

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .mypy-path .ruff_cache
