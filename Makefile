# Two entry points (see README): `make session` and `make test`. Both create .venv on first
# use and reinstall only when pyproject.toml changes.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
ARGS   ?=

.PHONY: session test test-all tools clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# the app alone: no torch
$(VENV)/.app-installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e .
	touch $@

# app + training stack + test tools (torch is pinned to the CPU build in [train])
$(VENV)/.dev-installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[train,dev]'
	touch $@ $(VENV)/.app-installed

session: $(VENV)/.app-installed
	$(BIN)/steer-tui session $(ARGS)

# tmux drives the end-to-end app test; install it when we can (root on Debian/Ubuntu)
tools:
	@command -v tmux >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
		(apt-get update -qq >/dev/null 2>&1; apt-get install -y -qq tmux >/dev/null 2>&1) || \
		echo "note: tmux not found; the tmux end-to-end test will be skipped"; }

test: $(VENV)/.dev-installed tools
	$(BIN)/python -m pytest -q $(ARGS)

# includes tests marked slow (long training runs, the full 200-kill fault test)
test-all: $(VENV)/.dev-installed tools
	$(BIN)/python -m pytest -q --runslow $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
