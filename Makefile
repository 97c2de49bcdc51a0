# Everything a fresh machine needs: a venv with the CPU torch wheel first (a bare
# `torch` requirement would pull GBs of CUDA wheels), the package with its CPU and
# test extras, Debian's chromium for the UI tests, and Playwright's driver.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo demo-multi test bench
setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[cpu,test]"
	@command -v chromium >/dev/null 2>&1 || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; }
	touch $(STAMP)

demo: setup
	$(BIN)/loraship demo --out demo-out --force

demo-multi: setup  # two adapters on one base, one endpoint: reuses the model `make demo` trained in demo-out
	$(BIN)/loraship demo --multi --out demo-out

test: setup
	$(BIN)/python -m pytest tests

bench: setup
	$(BIN)/python -m benchmarks.engine_vs_torch
