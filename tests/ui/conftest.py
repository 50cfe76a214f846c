"""Fixtures for the app tests: a session factory over the deterministic FakeEngine (or the
bundled model), and helpers that read the saved task FILE (what the tests assert on)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from steer_tui.core.fake_engine import FakeEngine
from steer_tui.ui.app import make_app
from steer_tui.ui.config import UIConfig
from steer_tui.ui.session_factory import SessionFactory

SCRIPTS = (
    "1. Apple\n2. Banana\n3. Cherry\n4. Mango",
    "The café serves crème brûlée for 5€ 🙂 and the tea is free.",
)


class SlowFakeEngine(FakeEngine):
    """The FakeEngine, slowed to ``delay`` seconds per evaluated token so a test can pause
    it mid-stream (the plain fake finishes a response in a millisecond)."""

    def __init__(self, *args: Any, delay: float = 0.01, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.delay = delay

    def _decode(self, tokens, n_past, all_logits):  # type: ignore[override]
        time.sleep(self.delay * len(tokens) if len(tokens) < 8 else 0)
        return super()._decode(tokens, n_past, all_logits)


def task_files(store: Path) -> list[Path]:
    return sorted((Path(store) / "tasks").glob("*.json"))


def read_task(store: Path, task_id: str | None = None) -> dict[str, Any]:
    """The saved task file (the only task in the store unless ``task_id`` is given)."""
    if task_id is not None:
        return json.loads((Path(store) / "tasks" / f"{task_id}.json").read_text(encoding="utf-8"))
    files = task_files(store)
    assert len(files) == 1, files
    return json.loads(files[0].read_text(encoding="utf-8"))


def nodes_by_id(data: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {n["id"]: n for n in data["nodes"]}


def path_of(data: dict[str, Any], end: str | None) -> list[dict[str, Any]]:
    by = nodes_by_id(data)
    out = []
    while end is not None:
        out.append(by[end])
        end = by[end]["parent"]
    return out[::-1]


def saved_end(data: dict[str, Any]) -> str | None:
    return data["session"]["end"]


def saved_response_text(data: dict[str, Any]) -> str:
    return "".join(n["text"] for n in path_of(data, saved_end(data)))


async def wait_idle(pilot, app, timeout: float = 10.0) -> None:
    """Wait until the session screen has loaded and no generation runs."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        await pilot.pause(0.02)
        scr = app.session_screen
        if (
            scr is not None
            and scr.session is not None
            and not scr.generating
            and not scr.busy
            and not scr.steering
            and scr.status.state not in ("loading", "streaming", "steering")
        ):
            await pilot.pause()
            return
    raise AssertionError(f"app did not become idle in {timeout}s (state {app.session_screen and app.session_screen.status.state!r})")


async def wait_for(pilot, cond, timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        await pilot.pause(0.02)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def fake_engine() -> FakeEngine:
    return FakeEngine(SCRIPTS)


@pytest.fixture
def store(tmp_path) -> Path:
    d = tmp_path / "store"
    d.mkdir()
    return d


@pytest.fixture
def config(tmp_path) -> UIConfig:
    return UIConfig(annotator="tester")


@pytest.fixture
def factory(store, fake_engine):
    f = SessionFactory(store=store, engine=fake_engine, sampling={"temperature": 0, "seed": 7, "max_tokens": 200}, annotator="tester")
    yield f
    f.close()


@pytest.fixture
def app_for(factory, config):
    """``app_for(prompt=..., task_id=..., tasks=...)`` builds an app on the fake factory."""

    def build(**kwargs: Any):
        kwargs.setdefault("session_factory", factory)
        kwargs.setdefault("config", config)
        return make_app(**kwargs)

    return build
