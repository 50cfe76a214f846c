"""Shared fixtures. The real bundled model is found once; tests that need it take
`model_path`. `--runslow` enables tests marked slow (long training, many kills)."""

from __future__ import annotations

import os
import tempfile

import pytest

# Never the user's cache: the llama.cpp probe verdict and converted models of this test run
# live in a temp dir (subprocesses inherit it). A CI that sets STEER_CACHE keeps its own.
os.environ.setdefault("STEER_CACHE", tempfile.mkdtemp(prefix="steer-test-cache-"))


STEER_CACHE = os.environ["STEER_CACHE"]

# The tests that may run past the default per-test timeout (pyproject.toml: 300 s), with
# their own limit in seconds, generous for 2 busy cores. A node id prefix names a whole module.
LONG_TESTS = {
    "tests/bench/test_loop_small.py::test_quick_loop_end_to_end": 1800,  # capture, train, 2 held-out runs
    "tests/train/test_smollm2_e2e.py": 1200,  # its module fixture trains on the bundled model
    "tests/train/test_ddp.py": 900,  # two processes per launcher
    "tests/reliability/test_crash.py": 2400,  # --runslow: 200 kills, 20 of them loading the real model
}


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--runslow", action="store_true", help="run tests marked slow")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        limit = next((t for prefix, t in LONG_TESTS.items() if item.nodeid.startswith(prefix)), None)
        if limit is not None and item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(limit))
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _steer_cache_stays_put():
    """A test that points STEER_CACHE elsewhere must put it back (monkeypatch.setenv does);
    otherwise every later test would share its cache. Fails the test that leaked it."""
    yield
    now = os.environ.get("STEER_CACHE")
    if now != STEER_CACHE:
        os.environ["STEER_CACHE"] = STEER_CACHE
        pytest.fail(f"STEER_CACHE was changed to {now!r} and not restored (use monkeypatch.setenv)", pytrace=False)


@pytest.fixture(scope="session")
def model_path():
    from steer_tui.core.models import default_model_path

    return default_model_path()


@pytest.fixture
def store_dir(tmp_path, monkeypatch):
    """A fresh store directory; STEER_STORE points at it so nothing touches the real one."""
    d = tmp_path / "store"
    d.mkdir()
    monkeypatch.setenv("STEER_STORE", str(d))
    return d
