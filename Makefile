# Everything a fresh machine needs: `make demo` and `make test` create .venv and install what they use.
# torch is installed first and pinned, so pip takes the CPU build instead of fetching CUDA packages.

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.preftune-installed
PIPELINE_ROOT ?= runs
# checkov pins versions of boto3 and friends that clash with the runtime's, so it lives in its own venv.
TOOLS_VENV ?= .venv-tools
TOOLS_STAMP := $(TOOLS_VENV)/.preftune-tools-installed
CHECKOV_SPEC ?= checkov==3.3.30
# The evaluation report is checked in a real browser: Debian's chromium package, driven by playwright.
CHROMIUM ?= /usr/bin/chromium
SUDO := $(shell [ "$$(id -u)" = 0 ] || command -v sudo)
REGISTRY ?= $(PIPELINE_ROOT)/registry

.PHONY: venv tools demo test lint compile bench clean

# The runtime dependencies install at the versions the image pins (containers/requirements.lock), so a fresh
# machine tests exactly what the image carries and what components/*/metadata.yaml says was verified.
$(STAMP): pyproject.toml containers/requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[test]" --constraint containers/requirements.lock
	touch $(STAMP)

$(TOOLS_STAMP):
	test -x $(TOOLS_VENV)/bin/python || $(PYTHON) -m venv $(TOOLS_VENV)
	$(TOOLS_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(TOOLS_VENV)/bin/python -m pip install --quiet "$(CHECKOV_SPEC)"
	touch $(TOOLS_STAMP)

$(CHROMIUM):
	$(SUDO) apt-get update -qq
	DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq chromium >/dev/null

venv: $(STAMP)

tools: $(TOOLS_STAMP)

demo: $(STAMP)
	$(BIN)/preftune run dpo --pipeline-root $(PIPELINE_ROOT) --param registry_uri=$(REGISTRY)
	$(BIN)/preftune run rlhf --pipeline-root $(PIPELINE_ROOT) --param registry_uri=$(REGISTRY)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

compile: $(STAMP)
	$(BIN)/preftune compile

test: $(STAMP) $(TOOLS_STAMP) $(CHROMIUM)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports
	$(BIN)/preftune compile --check
	$(BIN)/python -m pytest -q --durations=15; rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; rc=0; fi; exit $$rc

QUICK ?=
bench: $(STAMP)
	PYTHONPATH=. $(BIN)/python -m benchmarks $(if $(QUICK),--quick,)

clean:
	rm -rf $(PIPELINE_ROOT) build dist .pytest_cache .ruff_cache
