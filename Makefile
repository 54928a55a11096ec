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
# The CPU runtime image, built with podman on a debootstrap Debian base and smoke-tested (containers/image.py);
# Debian's podman, runc and debootstrap are installed like chromium. Building needs root (or sudo).
IMAGE ?= localhost/preftune:0.1.0-cpu
CONTAINER_TOOLS := /usr/bin/podman /usr/sbin/runc /usr/sbin/debootstrap

.PHONY: venv tools demo test lint compile figures bench bench-alignment clean image

# The runtime dependencies install at the versions the image pins (containers/requirements.lock), so a fresh
# machine tests exactly what the image carries and what components/*/metadata.yaml says was verified.
$(STAMP): pyproject.toml containers/requirements.lock
	@echo "installing torch (CPU build) and preftune's dependencies into $(VENV): about 2.5 GB, 3 to 5 minutes"
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[test]" --constraint containers/requirements.lock
	touch $(STAMP)

# The MLflow registry tests start a real `mlflow server`; the full mlflow package pins pyarrow and cryptography
# below the runtime lock, so the server lives in a venv of its own (the tests find it here).
MLFLOW_VENV ?= .venv-mlflow
MLFLOW_SPEC ?= mlflow==3.17.2
MLFLOW_STAMP := $(MLFLOW_VENV)/.preftune-mlflow-installed

$(MLFLOW_STAMP):
	@echo "installing the MLflow server for the registry tests into $(MLFLOW_VENV) (about 400 MB, 1 to 2 minutes)"
	test -x $(MLFLOW_VENV)/bin/python || $(PYTHON) -m venv $(MLFLOW_VENV)
	$(MLFLOW_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(MLFLOW_VENV)/bin/python -m pip install --quiet "$(MLFLOW_SPEC)"
	touch $(MLFLOW_STAMP)

$(TOOLS_STAMP):
	@echo "installing checkov for the infrastructure tests into $(TOOLS_VENV) (about 300 MB)"
	test -x $(TOOLS_VENV)/bin/python || $(PYTHON) -m venv $(TOOLS_VENV)
	$(TOOLS_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(TOOLS_VENV)/bin/python -m pip install --quiet "$(CHECKOV_SPEC)"
	touch $(TOOLS_STAMP)

$(CHROMIUM):
	$(SUDO) apt-get update -qq
	DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq chromium >/dev/null

$(CONTAINER_TOOLS):
	$(SUDO) apt-get update -qq
	DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq podman runc debootstrap >/dev/null

# Cached: podman reuses the layers of unchanged sources, and the smoke test is skipped for an image that passed.
image: $(STAMP) $(CONTAINER_TOOLS)
	$(SUDO) $(BIN)/python containers/image.py build --image $(IMAGE)
	$(SUDO) $(BIN)/python containers/image.py smoke --image $(IMAGE)

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

# The README's demo and compare figures, rewritten from the newest runs under $(PIPELINE_ROOT).
figures: $(STAMP)
	$(BIN)/python examples/readme_figures.py --runs $(PIPELINE_ROOT)

# tests/test_image.py runs the DPO pipeline in containers of $(IMAGE) (PREFTUNE_TEST_IMAGE).
test: $(STAMP) $(TOOLS_STAMP) $(MLFLOW_STAMP) $(CHROMIUM) image
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports
	$(BIN)/preftune compile --check
	PREFTUNE_TEST_IMAGE=$(IMAGE) $(BIN)/python -m pytest -q --durations=15; rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; rc=0; fi; exit $$rc

QUICK ?=
bench: $(STAMP)
	PYTHONPATH=. $(BIN)/python -m benchmarks $(if $(QUICK),--quick,)

# Issue 16's alignment-quality benchmark: DPO and RLHF on defaults, two tasks labelled by outside scorers.
bench-alignment: $(STAMP)
	PYTHONPATH=. $(BIN)/python -m benchmarks.alignment

clean:
	rm -rf $(PIPELINE_ROOT) build dist .pytest_cache .ruff_cache
