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

.PHONY: demo test test-fast bench lint typecheck clean venv venv-tflite

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

demo: $(VENV)/.installed-all
	$(BIN)/edgefleet demo

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

lint: $(VENV)/.installed-$(EXTRAS)
	$(BIN)/ruff check $(LINT_PATHS)

typecheck: $(VENV)/.installed-$(EXTRAS)
	$(BIN)/mypy

clean:
	rm -rf $(VENV) $(TFLITE_VENV) build *.egg-info .pytest_cache
