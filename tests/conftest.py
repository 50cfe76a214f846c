"""Shared fixtures. The real bundled model is found once; tests that need it take
`model_path`. `--runslow` enables tests marked slow (long training, many kills)."""

from __future__ import annotations

import os
import tempfile

import pytest

# Never the user's cache: the llama.cpp probe verdict and converted models of this test run
# live in a temp dir (subprocesses inherit it). A CI that sets STEER_CACHE keeps its own.
os.environ.setdefault("STEER_CACHE", tempfile.mkdtemp(prefix="steer-test-cache-"))


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--runslow", action="store_true", help="run tests marked slow")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


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
