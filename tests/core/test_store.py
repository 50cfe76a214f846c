"""Store: atomic saves, locks, safe ids and a clear message for every kind of broken file."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from steer_tui.core.store import (
    Store,
    StoreError,
    TaskLocked,
    check_task_id,
    dumps_tree,
    load_tree,
    save_tree,
)
from steer_tui.core.tree import TreeError
from tests.core.test_tree import human_node, make_tree, model_node

ROOT = Path(__file__).resolve().parents[2]


def sample_tree(task_id="t1"):
    t = make_tree()
    t.id = task_id
    a = model_node(t, None, [10, 11, 12, 13])
    tail = t.split(a.id, 2, "kl", "mn")
    human_node(t, a.id, [30, 31], replaces=tail.id)
    return t


def test_save_load_roundtrip(tmp_path):
    s = Store(tmp_path)
    t = sample_tree()
    p = s.save(t)
    assert p == tmp_path / "tasks" / "t1.json"
    assert s.load("t1").to_dict() == t.to_dict()
    assert not [x for x in p.parent.iterdir() if x.name.endswith(".tmp")]
    (info,) = s.list_tasks()
    assert (info.id, info.n_steers, info.error) == ("t1", 1, None)


def test_list_reports_broken_files_without_failing(tmp_path):
    s = Store(tmp_path)
    s.save(sample_tree("good"))
    (s.tasks_dir / "bad.json").write_text("{not json")
    infos = {i.id: i for i in s.list_tasks()}
    assert infos["good"].error is None
    assert "not valid JSON" in infos["bad"].error and "bad.json" in infos["bad"].error


@pytest.mark.parametrize(
    "content, expect",
    [
        (b"", "file is empty"),
        (b"{\"format\": \"steer-tree\", ", "not valid JSON (line 1"),
        (b"\xff\xfe garbage", "not UTF-8"),
        (b"[1, 2, 3]", "expected a JSON object"),
        (b'{"format": "other", "version": 1}', "format is 'other'"),
        (b'{"format": "steer-tree", "version": 9}', "newer than this steer understands"),
        (b"[" * 100000 + b"]" * 100000, "nested too deeply"),
    ],
)
def test_broken_files_give_specific_messages(tmp_path, content, expect):
    p = tmp_path / "x.json"
    p.write_bytes(content)
    with pytest.raises((StoreError, TreeError)) as ei:
        load_tree(p)
    assert expect in str(ei.value)
    assert str(p) in str(ei.value)


def test_truncated_file_is_a_clear_error(tmp_path):
    p = tmp_path / "t.json"
    text = dumps_tree(sample_tree())
    p.write_text(text[: len(text) // 2])
    with pytest.raises(StoreError, match="not valid JSON"):
        load_tree(p)


def test_huge_file_refused_before_reading(tmp_path, monkeypatch):
    p = tmp_path / "huge.json"
    with open(p, "wb") as fh:  # 3 MiB, sparse
        fh.truncate(3 << 20)
    monkeypatch.setenv("STEER_MAX_TREE_MB", "2")  # read when a file is loaded, not at import
    with pytest.raises(StoreError, match="file is 3 MiB, over the 2 MiB limit"):
        load_tree(p)
    monkeypatch.setenv("STEER_MAX_TREE_MB", "4")
    with pytest.raises(StoreError, match="not valid JSON"):  # past the size check
        load_tree(p)


def test_unique_task_id_takes_the_first_free_suffix():
    from steer_tui.core.store import unique_task_id

    assert unique_task_id("a", set()) == "a"
    assert unique_task_id("a", {"a"}) == "a.2"
    assert unique_task_id("a", {"a", "a.2", "a.3"}) == "a.4"
    assert unique_task_id("a", {"a", "a.3"}) == "a.2"


def test_export_renames_a_repeated_task_id_past_a_real_one(tmp_path):
    """Two annotators' stores with task "t", and a third store holding a real task "t.2":
    every exported row keeps a unique (task_id, steer_id) key."""
    from steer_tui.core.export import export
    from steer_tui.core.tree import Node, new_tree

    for i, tid in enumerate(["t", "t.2", "t"]):
        tree = new_tree(task_id=tid, title="x", model={"n_vocab": 10}, prompt={"text": "p", "tokens": [1]}, sampling={})
        tree.add(Node(id="n1", parent=None, author="human", kind="append", tokens=[2], text="b"))
        tree.accepted.append("n1")
        save_tree(tree, tmp_path / f"s{i}" / f"{tid}.json")
    report = export("sft", [tmp_path / f"s{i}" for i in range(3)], tmp_path / "out.jsonl")
    ids = [json.loads(line)["task_id"] for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert report.rows == 3 and sorted(ids) == ["t", "t.2", "t.3"]


def test_missing_file(tmp_path):
    with pytest.raises(StoreError, match="no such task file"):
        Store(tmp_path).load("nothere")


@pytest.mark.parametrize("bad", ["../etc/passwd", "a/b", "", ".hidden", "-x", "a" * 200, "x..y", "tab\tid", "é"])
def test_unsafe_task_ids_rejected(bad):
    with pytest.raises(StoreError, match="not valid"):
        check_task_id(bad)


@pytest.mark.parametrize("title", ["../../etc/passwd", "\x1b[31mred\x07", "", "   ", "日本語のタイトル", "a" * 500])
def test_new_task_id_is_safe_for_any_title(tmp_path, title):
    tid = Store(tmp_path).new_task_id(title)
    assert check_task_id(tid) == tid
    assert "/" not in tid and ".." not in tid and len(tid) < 80


def test_failed_save_keeps_old_file(tmp_path, monkeypatch):
    s = Store(tmp_path)
    t = sample_tree()
    s.save(t)
    before = (s.tasks_dir / "t1.json").read_bytes()
    human_node(t, None, [40])

    def no_space(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(StoreError, match="no space left on device"):
        s.save(t)
    monkeypatch.undo()
    assert (s.tasks_dir / "t1.json").read_bytes() == before
    assert not [x for x in s.tasks_dir.iterdir() if x.name.endswith(".tmp")]
    s.save(t)  # the retry succeeds and has the new node
    assert len(s.load("t1").nodes) == len(t.nodes)


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_store_is_a_clear_error(tmp_path):
    s = Store(tmp_path)
    s.tasks_dir.mkdir(parents=True)
    s.tasks_dir.chmod(0o500)
    try:
        with pytest.raises(StoreError, match="could not save"):
            s.save(sample_tree())
    finally:
        s.tasks_dir.chmod(0o700)


def test_lock_refuses_second_holder_and_frees_on_release(tmp_path):
    s = Store(tmp_path)
    lock = s.lock("t1")
    with pytest.raises(TaskLocked) as ei:
        s.lock("t1")
    assert ei.value.holder["pid"] == os.getpid()
    assert "open in another session" in str(ei.value)
    lock.release()
    s.lock("t1").release()


def test_lock_of_killed_process_is_recovered(tmp_path):
    code = textwrap.dedent(
        f"""
        import sys, time
        sys.path.insert(0, {str(ROOT)!r})
        from steer_tui.core.store import Store
        lock = Store({str(tmp_path)!r}).lock("t1")
        print("locked", flush=True)
        time.sleep(60)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(TaskLocked) as ei:
            Store(tmp_path).lock("t1")
        assert ei.value.holder["pid"] == proc.pid
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    Store(tmp_path).lock("t1").release()  # the kernel dropped the dead holder's lock


def test_kill_during_saves_leaves_a_loadable_file(tmp_path):
    """SIGKILL a process that saves a growing tree in a loop; the file always loads and
    holds at least every save that completed (the writer reports each completed save).

    Each kill waits for a number of completed saves, not for a fixed time, so a slow
    machine (a slow interpreter start) still kills a writer in the middle of its saves."""
    code = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(ROOT)!r})
        from steer_tui.core.store import Store
        from tests.core.test_tree import make_tree, model_node
        s = Store({str(tmp_path)!r})
        t = make_tree()
        for i in range(100000):
            model_node(t, None, list(range(3, 90)))
            s.save(t)
            print(len(t.nodes), flush=True)
        """
    )
    path = tmp_path / "tasks" / "t1.json"
    rng = random.Random(0)
    for after_saves in (2, 4, 10, 30, 60):
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=ROOT)
        try:
            seen, stamps = [], []
            for _ in range(after_saves):
                seen.append(proc.stdout.readline())
                stamps.append(time.monotonic())
            # then a random moment within the next save or two, measured on this machine
            # (killing right after a line would always hit the gap between two saves)
            time.sleep(rng.uniform(0, 2) * (stamps[-1] - stamps[0]) / (len(stamps) - 1))
        finally:
            proc.send_signal(signal.SIGKILL)
        out, _ = proc.communicate()
        done = [int(x) for x in "".join(seen).split() + out.split()]
        assert len(done) >= after_saves, f"the writer died on its own (rc {proc.returncode}) after {done}"
        tree = load_tree(path)
        assert len(tree.nodes) >= done[-1]
        path.unlink()


def test_taking_the_lock_removes_temp_files_of_dead_writers(tmp_path):
    s = Store(tmp_path)
    s.save(sample_tree())
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout.strip()
    stale = s.tasks_dir / f".t1.json.{dead}.abcd1234.tmp"
    alive = s.tasks_dir / f".t1.json.{os.getppid()}.abcd1234.tmp"
    other = s.tasks_dir / f".t2.json.{dead}.abcd1234.tmp"
    for p in (stale, alive, other):
        p.write_text("{partial")
    s.lock("t1").release()
    assert not stale.exists()
    assert alive.exists() and other.exists()  # a live pid's file, and another task's, stay
    assert s.load("t1").id == "t1"
