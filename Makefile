# Two commands set everything up on a fresh Debian machine:
#   make run   installs what is missing and starts the gateway on its embedded defaults
#   make test  installs what is missing and runs ruff, mypy and the whole test suite
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Debian packages the gateway and its tests use as real peers and tools.
APT_RUN_PACKAGES := dcmtk dicom3tools
APT_TEST_PACKAGES := $(APT_RUN_PACKAGES) chromium orthanc
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: run test lint typecheck pytest system-deps system-test-deps bench clean

run: system-deps $(VENV)/.stamp-run
	$(BIN)/kp-gateway serve $(ARGS)

test: system-test-deps $(VENV)/.stamp-test lint typecheck pytest

lint: $(VENV)/.stamp-test
	$(BIN)/ruff check kp_gateway tests bench
	$(BIN)/ruff format --check kp_gateway tests bench

typecheck: $(VENV)/.stamp-test
	$(BIN)/mypy

pytest: $(VENV)/.stamp-test
	$(BIN)/pytest $(PYTEST_ARGS)

bench: system-test-deps $(VENV)/.stamp-test
	$(BIN)/python bench/run_bench.py $(ARGS)

# apt-get only when a tool is missing, so repeated runs stay fast and offline.
system-deps:
	@missing=""; \
	command -v dcmsend >/dev/null || missing="$$missing dcmtk"; \
	command -v dciodvfy >/dev/null || missing="$$missing dicom3tools"; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  $(SUDO) apt-get update -q && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing; \
	fi

system-test-deps: system-deps
	@missing=""; \
	command -v chromium >/dev/null || missing="$$missing chromium"; \
	command -v Orthanc >/dev/null || missing="$$missing orthanc"; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  $(SUDO) apt-get update -q && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing; \
	fi

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.stamp-run: pyproject.toml | $(VENV)/bin/python
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.stamp-test: pyproject.toml | $(VENV)/bin/python
	$(BIN)/pip install -q -e '.[test]'
	touch $@ $(VENV)/.stamp-run

clean:
	rm -rf $(VENV) build *.egg-info .mypy_cache .ruff_cache .pytest_cache
