# The two setup commands: `make demo` and `make test`. Both work on a fresh machine with Python 3.11 only.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/pip --disable-pip-version-check -q
EXTRAS ?= all

.PHONY: demo test bench lint typecheck clean venv

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Reinstall when the dependency list changes; the stamp file remembers which extras are in.
# Ray (burst) goes in a second step: resolved together with litert-torch, pip backtracks for over 10 minutes.
$(VENV)/.installed-%: pyproject.toml | $(BIN)/python
	$(PIP) install -e ".[$*]"
	case ",$*," in *,all,*|*,burst,*) $(PIP) install -e ".[burst]" ;; esac
	touch $@

venv: $(VENV)/.installed-$(EXTRAS)

demo: $(VENV)/.installed-all
	$(BIN)/edgefleet demo

# The whole suite: lint and types first (fast), then every test.
test: $(VENV)/.installed-$(EXTRAS)
	$(BIN)/ruff check agent controlplane federated firmware_profiles tests bench
	$(BIN)/mypy
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: $(VENV)/.installed-all,bench
	$(BIN)/python bench/ingest.py
	$(BIN)/python bench/agent_footprint.py
	$(BIN)/python bench/inference.py
	$(BIN)/python bench/round.py
	$(BIN)/python bench/burst.py

lint: $(VENV)/.installed-$(EXTRAS)
	$(BIN)/ruff check agent controlplane federated firmware_profiles tests bench

typecheck: $(VENV)/.installed-$(EXTRAS)
	$(BIN)/mypy

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
