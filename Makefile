# Two entry points: `make demo` and `make test`. Both create/refresh .venv idempotently.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The CPU build of torch, pinned: a looser spec would pull gigabytes of CUDA packages.
TORCH := torch==2.13.0

.PHONY: demo test lint venv clean browser

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	$(BIN)/python -c "import torch; assert not torch.version.cuda, 'a CUDA torch build was installed'"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/p2pfl demo --out runs/demo

# The dashboard's browser test drives Debian's chromium (never a downloaded browser build):
# installed here when missing and running as root with apt (as CI does).
browser:
	@if [ ! -x /usr/bin/chromium ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing chromium (apt) for the dashboard's browser test"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	fi

test: $(STAMP) browser
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) runs
