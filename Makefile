# `make demo` runs the main job on the built-in data; `make test` runs lint and every test.
# Both create .venv on first use. torch and torchvision are installed first and pinned by
# constraints.txt so pip never swaps in a multi-GB CUDA build on a CPU machine.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.conaclip-installed

.PHONY: demo test test-fast lint venv ui

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt torch==2.13.0 torchvision==0.28.0
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/conaclip demo

# The MLflow UI on the demo's runs (127.0.0.1); OUT=DIR for another ablation's --out.
OUT ?= runs/demo
ui: $(STAMP)
	$(BIN)/conaclip ui --out $(OUT)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test-fast: lint
	$(BIN)/python -m pytest -m "not integration and not faults"

test: lint
	$(BIN)/python -m pytest
