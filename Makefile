# Two entry points (see README): `make session` and `make test` (`make test-all`, nightly,
# adds the slow tests). All create .venv on first use and reinstall only when
# pyproject.toml changes.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
ARGS   ?=

.PHONY: session test test-all coverage tools clean

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

# what CI runs: every test except those marked slow (the crash tests kill 100 times, not 200)
test: $(VENV)/.dev-installed tools
	$(BIN)/python -m pytest -q $(ARGS)

# nightly: the tests marked slow too (the full 200-kill fault test, FlexAttention)
test-all: $(VENV)/.dev-installed tools
	$(BIN)/python -m pytest -q --runslow $(ARGS)

# the default suite with line coverage per module of steer_tui/ and train/ (in-process code
# only: the CLI and crash-test subprocesses are not traced)
coverage: $(VENV)/.dev-installed tools
	$(BIN)/python -m pytest -q --cov=steer_tui --cov=train --cov-report=term $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
