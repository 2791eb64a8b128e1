# Two entry points: `make demo` and `make test`. Both create/refresh .venv idempotently.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The CPU build of torch, pinned: a looser spec would pull gigabytes of CUDA packages.
TORCH := torch==2.13.0

.PHONY: demo test lint venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[dev,ray]"
	$(BIN)/python -c "import torch; assert not torch.version.cuda, 'a CUDA torch build was installed'"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/p2pfl demo --out runs/demo

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) runs
