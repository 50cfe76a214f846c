"""An engine that dies is an error, not a dead terminal (issue 11).

llama.cpp can kill the process in ways Python cannot catch (the AMX SIGSEGV on some Xeons,
a SIGILL from a kernel the CPU lacks). The real ``steer-tui session`` runs in tmux on the
bundled model; after one steer, while the model streams again, the app process is killed
with the signal llama.cpp would raise. The terminal must come back sane (alternate screen
left, cursor shown, mouse reporting off, cooked mode with echo), a message must say what
happened and where the work is, and the task file must hold the steer made before the
crash."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest

from tests.ui.test_tmux_e2e import Tmux, _q, steer_tui_command, tmux_env

pytestmark = pytest.mark.skipif(subprocess.run(["which", "tmux"], capture_output=True).returncode != 0,
                                reason="tmux is not installed")


def _app_pid(store: str, timeout: float = 30.0) -> int:
    """The process running the app: of the processes started for this store, the innermost
    (the supervisor's child, or the only one when nothing supervises)."""
    deadline = time.monotonic() + timeout
    found: list[int] = []
    while time.monotonic() < deadline:
        out = subprocess.run(["pgrep", "-f", "--", f"session --store {store}"], capture_output=True, text=True).stdout
        found = [int(p) for p in out.split()]
        inner = [p for p in found if not any(_ppid(q) == p for q in found)]
        if len(inner) == 1:
            return inner[0]
        time.sleep(0.1)
    raise AssertionError(f"no single app process for store {store} (found {found})")


def _ppid(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
            return int(fh.read().rsplit(")", 1)[1].split()[1])
    except OSError:
        return -1


@pytest.mark.parametrize("sig", [signal.SIGSEGV, signal.SIGILL], ids=["SIGSEGV", "SIGILL"])
def test_native_crash_mid_stream_leaves_terminal_sane_and_task_saved(tmp_path, model_path, sig):
    store = str(tmp_path / "store")
    tmux = Tmux(tmp_path)
    env = tmux_env(tmp_path)
    # a raw counting prompt streams for as long as we like at temperature 0
    cmd = (
        f"{steer_tui_command()} session --store {_q(store)} --model {_q(str(model_path))} --raw "
        f"--prompt '1, 2, 3, 4, 5, 6, 7, 8,' --n-ctx 4096 --temperature 0 --seed 1 --max-tokens 3000; "
        # after the app: the exit code and the terminal's mode, printed into the pane
        "echo EXITED $?; stty -a | tr ' ' '\\n' | grep -E '^-?(icanon|echo)$' | tr '\\n' ' '; echo MODE"
    )
    tmux.start(cmd, env)
    try:
        tmux.wait_for(" 12,", timeout=120)  # a few tokens to roll back into
        tmux.keys("space")
        tmux.wait_for("paused")
        tmux.keys("Home", "Right", "Right", "Right")
        tmux.wait_for("#3 ")
        tmux.keys("Enter")
        tmux.wait_for("replace from #3")
        tmux.type(" 99,")
        tmux.keys("Enter")
        tmux.wait_for("steers 1", timeout=60)
        tmux.wait_for("streaming", timeout=60)  # the model writes on after the steer
        os.kill(_app_pid(store), sig)
        screen = tmux.wait_for("MODE", timeout=30)
        flags = tmux.run("display", "-p", "-t", tmux.session, "#{alternate_on} #{cursor_flag} #{mouse_any_flag}").split()
    finally:
        tmux.kill()
    assert f"EXITED {128 + sig}" in screen
    text = "".join(screen.splitlines())  # the message wraps at 80 columns
    assert f"crashed with {signal.Signals(sig).name}" in text
    assert "steer-tui list" in text  # where the work is
    assert "icanon echo" in screen, screen  # cooked mode, echo on
    assert flags == ["0", "1", "0"], f"alternate screen / cursor / mouse: {flags}"
    files = list((tmp_path / "store" / "tasks").glob("*.json"))
    assert len(files) == 1
    data = json.loads(files[0].read_text(encoding="utf-8"))
    steers = [n for n in data["nodes"] if n["author"] == "human"]
    assert [s["text"] for s in steers] == [" 99,"]
