# `make demo` runs the main job on the built-in data; `make test` runs lint and every test.
# Both create .venv on first use. torch and torchvision are installed first and pinned by
# constraints.txt so pip never swaps in a multi-GB CUDA build on a CPU machine.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.conaclip-installed

.PHONY: demo test test-fast lint venv ui img2dataset

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
	$(BIN)/python -m pytest -m "not integration and not faults and not slow"

# img2dataset (test-only: tests/test_img2dataset.py runs its CLI on a local HTTP server) gets
# a venv of its own inside .venv: it needs pandas < 3 and webdataset 0.2.x, which the product's
# constraints.txt rules out, and it must never re-resolve the product's torch. It pulls no torch
# (checked below, so a future release that does fails here, not with a silent CUDA download).
I2D_VERSION := 1.47.0
I2D_VENV := $(VENV)/img2dataset
I2D_STAMP := $(I2D_VENV)/.installed-$(I2D_VERSION)

img2dataset: $(I2D_STAMP)

$(I2D_STAMP): | $(STAMP)
	test -x $(I2D_VENV)/bin/python || $(PYTHON) -m venv $(I2D_VENV)
	$(I2D_VENV)/bin/python -m pip install --quiet img2dataset==$(I2D_VERSION)
	$(I2D_VENV)/bin/python -c "import importlib.util as u, sys; sys.exit(u.find_spec('torch') is not None)"
	touch $@

# CONACLIP_IMG2DATASET makes the img2dataset test fail, never skip, when the CLI is missing.
test: lint $(I2D_STAMP)
	CONACLIP_IMG2DATASET=$(I2D_VENV)/bin/img2dataset $(BIN)/python -m pytest
