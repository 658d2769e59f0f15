# `make repro` runs the pipeline, `make test` the test suite; each sets up .venv first when needed.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
WEIGHTS ?=

export DVC_NO_ANALYTICS := 1

.PHONY: install repro test lint compare

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,timm,torchcodec]'
	$(BIN)/python -m pipeline.plots
	touch $@

install: $(BIN)/.installed

# make repro                 -> dvc repro with params.yaml as it is
# make repro WEIGHTS=random  -> an experiment with extract.weights overridden (offline use)
repro: install
ifeq ($(WEIGHTS),)
	PATH="$(abspath $(BIN)):$$PATH" dvc repro
else
	PATH="$(abspath $(BIN)):$$PATH" dvc exp run -S extract.weights=$(WEIGHTS)
endif
	PATH="$(abspath $(BIN)):$$PATH" dvc metrics show

# make compare                      -> the workspace's test predictions against HEAD's, paired (pipeline.compare)
# make compare ARGS="exp-a exp-b"   -> two revisions or experiments; ARGS=--all: every experiment against HEAD
compare: install
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m pipeline.compare $(ARGS)

test: install
	$(BIN)/ruff check pipeline tests bench
	$(BIN)/ruff format --check pipeline tests bench
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m pytest

lint: install
	$(BIN)/ruff check --fix pipeline tests bench
	$(BIN)/ruff format pipeline tests bench
