"""Concurrent use: one writer per task (a second session is refused or read-only), a killed
session's lock is recovered, and two annotators' stores merge into one training set."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from steer_tui.core.fake_engine import FakeEngine
from steer_tui.core.session import Session
from steer_tui.core.session_errors import SessionError
from steer_tui.core.store import Store, TaskLocked

from .conftest import REPO, build_session, run_cli


def test_second_session_is_refused_and_read_only_works(tmp_path):
    with build_session(tmp_path) as s:
        with pytest.raises(TaskLocked) as ei:
            Session.open(store=tmp_path, task_id=s.task_id, model=FakeEngine())
        assert str(os.getpid()) in str(ei.value) and s.task_id in str(ei.value)
        assert ei.value.holder["pid"] == os.getpid()
        with Session.open(store=tmp_path, task_id=s.task_id, model=FakeEngine(), read_only=True) as ro:
            assert [n.to_dict() for n in ro.tree.nodes] == [n.to_dict() for n in s.tree.nodes]
            for op in (lambda: ro.correct(" x"), lambda: list(ro.generate(max_tokens=2)), ro.accept, ro.undo, ro.save):
                with pytest.raises(SessionError, match="read-only"):
                    op()
        before = Path(s.store.task_path(s.task_id)).read_bytes()
        s.correct(" still mine")  # the writer is unaffected by the reader
        assert Path(s.store.task_path(s.task_id)).read_bytes() != before
    # closed: the next session gets it
    with Session.open(store=tmp_path, task_id=s.task_id, model=FakeEngine()) as again:
        assert again.tree.node(again.end).text == " still mine"


HOLDER = textwrap.dedent(
    """
    import sys, time
    from steer_tui.core.fake_engine import FakeEngine
    from steer_tui.core.session import Session
    s = Session.open(store=sys.argv[1], task_id=sys.argv[2], model=FakeEngine())
    s.correct(" from the child")
    print("HOLDING", flush=True)
    time.sleep(600)
    """
)


def test_lock_held_by_other_process_then_recovered_after_sigkill(tmp_path):
    with build_session(tmp_path) as s:
        tid = s.task_id
    env = dict(os.environ, PYTHONPATH=str(REPO))
    child = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path), tid], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        line = child.stdout.readline().decode()
        assert line.strip() == "HOLDING", child.stderr.read().decode()
        with pytest.raises(TaskLocked) as ei:
            Session.open(store=tmp_path, task_id=tid, model=FakeEngine())
        assert ei.value.holder["pid"] == child.pid and f"process {child.pid}" in str(ei.value)
        child.send_signal(signal.SIGKILL)
        child.wait()
    finally:
        if child.poll() is None:
            child.kill()
        child.stdout.close()
        child.stderr.close()
    lock_file = Store(tmp_path).tasks_dir / f"{tid}.lock"
    assert json.loads(lock_file.read_text())["pid"] == child.pid  # the stale lock is still on disk
    with Session.open(store=tmp_path, task_id=tid, model=FakeEngine()) as s2:  # ...and recovered
        assert s2.tree.node(s2.end).text == " from the child"  # the child's saved steer is there
        assert json.loads(lock_file.read_text())["pid"] == os.getpid()
        s2.correct(" and the parent")


def test_stale_lock_file_from_dead_pid_does_not_block(tmp_path):
    with build_session(tmp_path) as s:
        tid = s.task_id
    p = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(p.stdout)
    lock_file = Store(tmp_path).tasks_dir / f"{tid}.lock"
    lock_file.write_text(json.dumps({"pid": dead, "host": os.uname().nodename, "since": "2020-01-01T00:00:00Z"}))
    with Session.open(store=tmp_path, task_id=tid, model=FakeEngine()) as s2:
        assert s2.tree.id == tid


# ------------------------------------------------------------------ two annotators


def _annotator_store(root: Path, who: str, task_id: str | None, prompt: str, correction: str) -> Path:
    eng = FakeEngine()
    s = Session.create(store=root, prompt=prompt, model=eng, sampling={"temperature": 0, "seed": 1}, task_id=task_id, annotator=who)
    list(s.generate(max_tokens=12))
    s.rollback(6)
    s.correct(correction)
    s.close()
    return root


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_two_annotators_merge_with_distinct_task_ids(tmp_path):
    a = _annotator_store(tmp_path / "alice", "alice", None, "Four fruits", " Kiwi")
    b = _annotator_store(tmp_path / "bob", "bob", None, "Four fruits", " Plum")
    out = tmp_path / "dpo.jsonl"
    r = run_cli("export", "--format", "dpo", "--out", str(out), "--from", str(a), "--from", str(b))
    assert r.returncode == 0, r.stderr
    rows = _rows(out)
    keys = [(row["task_id"], row["steer_id"]) for row in rows]
    assert len(rows) == 2 and len(set(keys)) == 2
    assert sorted(row["annotator"] for row in rows) == ["alice", "bob"]
    assert sorted(row["chosen"] for row in rows) == [" Kiwi", " Plum"]


def test_two_annotators_same_queue_ids_export_keys_unique(tmp_path):
    """Both annotators work through the same --tasks file whose lines carry "id" (the app
    uses it as the task id), so both stores hold a task "fruit" whose steers are both "n3"."""
    a = _annotator_store(tmp_path / "alice", "alice", "fruit", "Four fruits", " Kiwi")
    b = _annotator_store(tmp_path / "bob", "bob", "fruit", "Four fruits", " Plum")
    out = tmp_path / "dpo.jsonl"
    r = run_cli("export", "--format", "dpo", "--out", str(out), "--from", str(a), "--from", str(b))
    assert r.returncode == 0, r.stderr
    rows = _rows(out)
    assert sorted(row["chosen"] for row in rows) == [" Kiwi", " Plum"]  # nothing dropped (passes today)
    keys = [(row["task_id"], row["steer_id"]) for row in rows]
    assert len(set(keys)) == len(keys), keys


def test_two_annotators_same_queue_ids_train_data_keeps_both(tmp_path):
    pytest.importorskip("train.data")
    from train.data import load_trees

    a = _annotator_store(tmp_path / "alice", "alice", "fruit", "Four fruits", " Kiwi")
    b = _annotator_store(tmp_path / "bob", "bob", "fruit", "Four fruits", " Plum")
    rep = load_trees([a, b])
    steers = [s.node.text for t in rep.trees for s in t.steers()]
    assert sorted(steers) == [" Kiwi", " Plum"]


def test_two_annotators_distinct_ids_train_data_loads_both(tmp_path):
    pytest.importorskip("train.data")
    from train.data import load_trees

    a = _annotator_store(tmp_path / "alice", "alice", None, "Four fruits", " Kiwi")
    b = _annotator_store(tmp_path / "bob", "bob", None, "Four fruits", " Plum")
    rep = load_trees([a, b])
    assert len(rep.trees) == 2 and not rep.errors
    assert sorted(s.node.text for t in rep.trees for s in t.steers()) == [" Kiwi", " Plum"]


HOLDER_REAL = textwrap.dedent(
    """
    import sys, time
    from steer_tui.core.engine import open_engine
    from steer_tui.core.session import Session
    s = Session.open(store=sys.argv[1], task_id=sys.argv[2], model=open_engine(None, n_ctx=512))
    print("HOLDING", flush=True)
    time.sleep(600)
    """
)


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")
def test_cli_session_on_a_locked_task_opens_read_only_and_says_who_holds_it(tmp_path, model_path):
    """The real ``steer-tui session --task`` (in tmux) on a task another process holds: it
    says which process holds it, opens it read-only, refuses to change it, and exits 0."""
    from steer_tui.core.engine import open_engine
    from tests.ui.test_tmux_e2e import Tmux, _q, steer_tui_command

    engine = open_engine(model_path, n_ctx=512)
    with Session.create(store=tmp_path, prompt="Give four examples of fruit.", model=engine, sampling={"temperature": 0, "seed": 1}) as s:
        list(s.generate(max_tokens=8))
        tid = s.task_id
    engine.close()
    path = Store(tmp_path).task_path(tid)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    child = subprocess.Popen([sys.executable, "-c", HOLDER_REAL, str(tmp_path), tid], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    tmux = Tmux(tmp_path)
    try:
        assert child.stdout.readline().decode().strip() == "HOLDING", child.stderr.read().decode()
        before = path.read_bytes()
        tmux.start(
            f"{steer_tui_command()} session --store {_q(str(tmp_path))} --task {_q(tid)} --n-ctx 512",
            {"STEER_CONFIG": str(tmp_path / "no-config.toml"), "TERM": "xterm-256color", "PATH": os.environ.get("PATH", ""),
             "HOME": os.environ.get("HOME", str(tmp_path)), "PYTHONPATH": str(REPO)},
        )
        screen = tmux.wait_for(f"process {child.pid}", timeout=120)
        assert "open in another session" in screen and "read-only" in screen, screen
        tmux.keys("d")  # accept: refused, the task is not ours
        tmux.wait_for("open read-only", timeout=30)
        tmux.keys("C-q")
        tmux.wait_for("EXITED 0", timeout=60)
        assert path.read_bytes() == before  # nothing written
        lock = json.loads((Store(tmp_path).tasks_dir / f"{tid}.lock").read_text())
        assert lock["pid"] == child.pid and child.poll() is None  # the holder still holds it
    finally:
        tmux.kill()
        child.kill()
        child.wait()
        child.stdout.close()
        child.stderr.close()
