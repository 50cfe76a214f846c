"""Fixtures for the reliability tests: valid trees built by a real Session on the
FakeEngine, and a runner for the ``steer-tui`` CLI in a subprocess (exit code, stderr)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from steer_tui.core.fake_engine import FakeEngine
from steer_tui.core.session import Session
from steer_tui.core.store import Store

REPO = Path(__file__).resolve().parents[2]


def fault_kills(default: int, config: pytest.Config) -> int:
    """Total kills for the crash tests: STEER_FAULT_KILLS, else 200 with --runslow, else ``default``."""
    env = os.environ.get("STEER_FAULT_KILLS")
    if env:
        return int(env)
    return 200 if config.getoption("--runslow") else default


def build_session(store: Path | Store, *, task_id: str = "t-valid", engine: FakeEngine | None = None, steers: int = 2) -> Session:
    """A Session on the FakeEngine holding ``steers`` steers, an undone one and an accept."""
    s = Session.create(store=store, prompt="Give four fruits", model=engine or FakeEngine(), sampling={"temperature": 0, "seed": 3, "max_tokens": 40}, task_id=task_id, annotator="alice")
    list(s.generate(max_tokens=20))
    for i in range(steers):
        n = len(s.response_tokens)
        s.rollback(max(1, n - 5))
        s.correct(f" Kiwi{i}")
        list(s.generate(max_tokens=6))
    s.rollback(len(s.response_tokens) - 2)
    s.correct(" oops")
    s.undo()
    s.accept()
    return s


@pytest.fixture
def valid_tree_dict(tmp_path) -> dict:
    """The JSON of a real saved task file (FakeEngine), as a dict to mutate."""
    store = tmp_path / "valid-store"
    with build_session(store) as s:
        path = s.store.task_path(s.task_id)
    return json.loads(path.read_text(encoding="utf-8"))


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """``steer-tui ARGS`` in a fresh interpreter; returns the completed process (text)."""
    e = dict(os.environ)
    e.update(env or {})
    e["PYTHONPATH"] = str(REPO) + os.pathsep + e.get("PYTHONPATH", "")
    return subprocess.run(
        [sys.executable, "-c", "import sys; from steer_tui.cli import main; sys.exit(main())", *args],
        capture_output=True,
        text=True,
        encoding="utf-8",
        errors="replace",
        env=e,
        timeout=timeout,
        cwd=str(REPO),
    )


def assert_user_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    """Exit code 2, one clear message on stderr naming ``needles``, and no traceback."""
    msg = f"rc={proc.returncode}\nstdout={proc.stdout[-2000:]}\nstderr={proc.stderr[-4000:]}"
    assert "Traceback" not in proc.stderr, msg
    assert proc.returncode == 2, msg
    for n in needles:
        assert n in proc.stderr, f"{n!r} not in stderr\n{msg}"
