"""End to end: the real ``steer-tui session`` in tmux on the bundled model, driven with
send-keys as a person would type, read back with capture-pane; then the task file."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")


class Tmux:
    def __init__(self, tmp: Path) -> None:
        self.socket = f"steer-e2e-{uuid.uuid4().hex[:8]}"
        self.session = "steer"

    def run(self, *args: str) -> str:
        return subprocess.run(["tmux", "-L", self.socket, *args], check=True, capture_output=True, text=True).stdout

    def start(self, command: str, env: dict[str, str]) -> None:
        exports = " ".join(f"{k}={_q(v)}" for k, v in env.items())
        self.run("new-session", "-d", "-x", "80", "-y", "24", "-s", self.session, f"env {exports} {command}; echo EXITED $?; sleep 30")

    def keys(self, *keys: str) -> None:
        for k in keys:
            self.run("send-keys", "-t", self.session, k)
            time.sleep(0.05)

    def type(self, text: str) -> None:
        self.run("send-keys", "-t", self.session, "-l", text)

    def screen(self) -> str:
        return self.run("capture-pane", "-p", "-t", self.session)

    def wait_for(self, needle: str, timeout: float = 120.0) -> str:
        deadline = time.monotonic() + timeout
        screen = ""
        while time.monotonic() < deadline:
            screen = self.screen()
            if needle in screen:
                return screen
            time.sleep(0.2)
        raise AssertionError(f"{needle!r} did not appear on screen within {timeout}s; screen:\n{screen}")

    def kill(self) -> None:
        subprocess.run(["tmux", "-L", self.socket, "kill-server"], capture_output=True)


def _q(s: str) -> str:
    return "'" + s.replace("'", "'\\''") + "'"


REPO = Path(__file__).resolve().parents[2]


def tmux_env(tmp_path: Path) -> dict[str, str]:
    """A clean environment for the app in tmux: no user config, the test run's cache;
    PYTHONPATH makes it run this checkout."""
    return {
        "STEER_CONFIG": str(tmp_path / "no-config.toml"),
        "STEER_CACHE": os.environ.get("STEER_CACHE", str(tmp_path / "cache")),
        "TERM": "xterm-256color",
        "PATH": os.environ.get("PATH", ""),
        "HOME": os.environ.get("HOME", str(tmp_path)),
        "PYTHONPATH": str(REPO),
    }


def steer_tui_command() -> str:
    exe = Path(sys.executable).parent / "steer-tui"
    if exe.exists():
        return _q(str(exe))
    return f"{_q(sys.executable)} -m steer_tui.cli"


def test_tmux_steering_session(tmp_path, model_path):
    store = tmp_path / "store"
    tmux = Tmux(tmp_path)
    env = tmux_env(tmp_path)
    cmd = (
        f"{steer_tui_command()} session --store {_q(str(store))} --model {_q(str(model_path))} "
        f"--prompt 'Give four examples of fruit.' --n-ctx 512 --temperature 0 --seed 1 --max-tokens 20"
    )
    tmux.start(cmd, env)
    try:
        screen = tmux.wait_for("(max tokens)", timeout=180)
        assert "steers 0" in screen and "ctx " in screen and "saved" in screen
        # move the cursor to the 4th token, open the editor, type a correction, submit
        tmux.keys("Home", "Right", "Right", "Right")
        screen = tmux.wait_for("#3 ")
        tmux.keys("Enter")
        tmux.wait_for("replace from #3")
        tmux.type(" Kiwi")
        tmux.wait_for("Kiwi")
        tmux.keys("Enter")
        screen = tmux.wait_for("steers 1", timeout=120)
        tmux.wait_for("(max tokens)", timeout=120)
        tmux.keys("d")
        tmux.wait_for("accepted")
        tmux.keys("C-q")
        screen = tmux.wait_for("EXITED 0", timeout=60)
    finally:
        tmux.kill()
    files = list((store / "tasks").glob("*.json"))
    assert len(files) == 1
    data = json.loads(files[0].read_text(encoding="utf-8"))
    by = {n["id"]: n for n in data["nodes"]}
    steers = [n for n in data["nodes"] if n["author"] == "human"]
    assert len(steers) == 1 and steers[0]["kind"] == "correction" and steers[0]["text"] == " Kiwi"
    assert by[steers[0]["replaces"]]["author"] == "model"
    prefix = []
    cur = steers[0]["parent"]
    while cur:
        prefix = by[cur]["tokens"] + prefix
        cur = by[cur]["parent"]
    assert len(prefix) == 3
    assert data["accepted"] and data["sampling"]["temperature"] == 0 and data["sampling"]["seed"] == 1


def test_tmux_read_only_session(tmp_path, model_path):
    """``steer-tui session --task ID --read-only``: the task is shown, every change is refused
    with a notice, nothing is written, and the task is not left locked."""
    from steer_tui.core.engine import open_engine
    from steer_tui.core.session import Session

    store = tmp_path / "store"
    engine = open_engine(model_path, n_ctx=512)
    try:
        with Session.create(store=store, prompt="Give four examples of fruit.", model=engine, sampling={"temperature": 0, "seed": 1}) as s:
            list(s.generate(max_tokens=6))
            tid, text = s.task_id, s.response_text
        path = s.store.task_path(tid)
        before = path.read_bytes()
        tmux = Tmux(tmp_path)
        tmux.start(f"{steer_tui_command()} session --store {_q(str(store))} --task {_q(tid)} --read-only --n-ctx 512", tmux_env(tmp_path))
        try:
            screen = tmux.wait_for("read-only", timeout=120)
            assert text.splitlines()[0].strip() in screen, screen
            tmux.keys("space")  # continue: refused
            tmux.wait_for("This task is open read-only.", timeout=30)
            tmux.keys("d", "u")  # accept, undo: refused too (each with a notice)
            tmux.wait_for("is open read-only", timeout=30)
            tmux.keys("C-q")
            tmux.wait_for("EXITED 0", timeout=60)
        finally:
            tmux.kill()
        assert path.read_bytes() == before
        with Session.open(store=store, task_id=tid, model=engine) as again:  # not left locked
            assert again.response_text == text
    finally:
        engine.close()
