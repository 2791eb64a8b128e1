# Two entry points: `make demo` and `make test`. Both create/refresh .venv idempotently.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The CPU build of torch, pinned: a looser spec would pull gigabytes of CUDA packages.
TORCH := torch==2.13.0

.PHONY: demo test lint venv clean system-tools

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

# Tools of the slow tests that the venv cannot hold: Debian's chromium (the dashboard's browser
# test; never a downloaded browser build) and iptables (the NAT of the relay test). Installed
# here when missing and running as root with apt, as CI does; elsewhere those tests skip.
SYSTEM_TOOLS := /usr/bin/chromium:chromium /usr/sbin/iptables:iptables
system-tools:
	@missing=""; for tool in $(SYSTEM_TOOLS); do \
		[ -x "$${tool%%:*}" ] || missing="$$missing $${tool##*:}"; done; \
	if [ -n "$$missing" ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing$$missing (apt) for the slow tests"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi

test: $(STAMP) system-tools
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) runs
