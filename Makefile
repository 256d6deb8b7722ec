# The two setup commands: `make demo` and `make test`. Both work on a fresh machine with Python 3.11 only.
# The development loop is `make test-fast`: lint, types and every test not marked `slow`.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/pip --disable-pip-version-check -q
EXTRAS ?= all
# The second, device-like environment: `edgefleet[agent-tflite]` alone (tflite-runtime 2.14, numpy<2, no LiteRT),
# as on a Raspberry Pi 4 with the bullseye image. The tests run that runtime's checks and a real agent in it
# (through this variable); the main environment has LiteRT, which the agent would prefer.
TFLITE_VENV ?= .venv-tflite
export EDGEFLEET_TFLITE_PYTHON ?= $(abspath $(TFLITE_VENV))/bin/python

LINT_PATHS := agent controlplane federated firmware_profiles tests bench

.PHONY: demo demo-serve test test-fast bench lint typecheck clean venv venv-tflite dist

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Reinstall when the dependency list changes; the stamp file remembers which extras are in.
# Ray (burst) goes in a second step: resolved together with litert-torch, pip backtracks for over 10 minutes.
$(VENV)/.installed-%: pyproject.toml | $(BIN)/python
	$(PIP) install -e ".[$*]"
	case ",$*," in *,all,*|*,burst,*) $(PIP) install -e ".[burst]" ;; esac
	touch $@

venv: $(VENV)/.installed-$(EXTRAS)

# Built anew when the dependency list changes (about 10 s: wheels only, nothing to compile).
$(TFLITE_VENV)/.installed: pyproject.toml
	rm -rf $(TFLITE_VENV)
	$(PYTHON) -m venv $(TFLITE_VENV)
	$(TFLITE_VENV)/bin/pip --disable-pip-version-check -q install -e ".[agent-tflite]"
	touch $@

venv-tflite: $(TFLITE_VENV)/.installed

# `make demo` ends by printing the console's URL; `make demo-serve` (or `make demo ARGS=--serve`) keeps the control
# plane, its web console and the agents up until Ctrl-C. ARGS passes any other option: `make demo ARGS="--agents 6"`.
demo: $(VENV)/.installed-all
	$(BIN)/edgefleet demo $(ARGS)

demo-serve: $(VENV)/.installed-all
	$(BIN)/edgefleet demo --serve $(ARGS)

# The whole suite (what CI runs): lint and types first (fast), then every test.
test: $(VENV)/.installed-$(EXTRAS) $(TFLITE_VENV)/.installed
	$(BIN)/ruff check $(LINT_PATHS)
	$(BIN)/mypy
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The development loop: lint, types and every test not marked `slow` (model builds, Ray heads, Flower rounds, the
# demo, control planes and agents in subprocesses: anything over a few seconds), in under 3 minutes on 2 cores.
test-fast: $(VENV)/.installed-$(EXTRAS) $(TFLITE_VENV)/.installed
	$(BIN)/ruff check $(LINT_PATHS)
	$(BIN)/mypy
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

bench: $(VENV)/.installed-all,bench
	$(BIN)/python bench/ingest.py
	$(BIN)/python bench/agent_footprint.py
	$(BIN)/python bench/inference.py
	$(BIN)/python bench/round.py
	$(BIN)/python bench/burst.py
	$(BIN)/python bench/enroll.py
	$(BIN)/python bench/console.py
	$(BIN)/python bench/metrics.py

lint: $(VENV)/.installed-$(EXTRAS)
	$(BIN)/ruff check $(LINT_PATHS)

typecheck: $(VENV)/.installed-$(EXTRAS)
	$(BIN)/mypy

# `make dist`: the edgefleet wheel (in $(DIST)/) and a wheelhouse ($(DIST)/wheels/) with it and every wheel
# `edgefleet[agent]` needs, so that a device installs with no package index:
#   pip install --no-index --find-links $(DIST)/wheels "edgefleet[agent]"
# The wheelhouse is for this machine's CPU and Python. For another (a Raspberry Pi: aarch64, Python 3.11), list
# every wheel platform tag its glibc accepts (pip does not infer older manylinux tags from a newer one) and pip takes
# only ready-made wheels: deploy/agent/README.md has the line for Raspberry Pi OS bookworm.
#   make dist DIST_PLATFORMS="manylinux_2_36_aarch64 ... manylinux2014_aarch64" DIST_PYTHON=311
# DIST_EXTRAS=agent-tflite for images with tflite-runtime instead of LiteRT.
DIST ?= dist
DIST_EXTRAS ?= agent
DIST_PLATFORMS ?=
DIST_PYTHON ?= 311
dist: | $(BIN)/python
	rm -rf $(DIST) build
	$(PIP) wheel --no-deps --wheel-dir $(DIST) .
	if [ -z "$(DIST_PLATFORMS)" ]; then \
	  $(PIP) wheel --wheel-dir $(DIST)/wheels "$$(ls $(DIST)/edgefleet-*.whl)[$(DIST_EXTRAS)]"; \
	else \
	  $(PIP) download --only-binary=:all: --python-version $(DIST_PYTHON) --implementation cp \
	    $(foreach p,$(DIST_PLATFORMS),--platform $(p)) --dest $(DIST)/wheels \
	    "$$(ls $(DIST)/edgefleet-*.whl)[$(DIST_EXTRAS)]"; \
	fi
	ls $(DIST)/wheels

clean:
	rm -rf $(VENV) $(TFLITE_VENV) build *.egg-info .pytest_cache
	rm -rf $(DIST)
