# make run  : create .venv if missing, install, run the main job on the embedded defaults.
# make test : create .venv if missing, install with dev extras, lint (ruff), run the tests: a
#             pytest-xdist worker per core, each test file on one worker (a file's tests share
#             module fixtures and run in order).
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
export MLFLOW_DISABLE_TELEMETRY ?= true
export DO_NOT_TRACK ?= true
export DVC_NO_ANALYTICS ?= 1
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
# The first ephemeral Prefect server start takes ~20 s on 2 cores; the default timeout is 20 s.
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 120

.PHONY: run test install install-dev clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade --quiet pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[all]'
	touch $@

# The dev extras include all of nhle[all]: one pip run installs both.
$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(VENV)/.installed $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

run: $(VENV)/.installed
	$(BIN)/nhle run

test: $(VENV)/.installed-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -n auto --dist loadfile

clean:
	rm -rf $(VENV) build *.egg-info
