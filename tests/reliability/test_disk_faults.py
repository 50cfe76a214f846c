"""Disk faults: a save that fails keeps the data in memory, says why (SaveError naming the
file), damages nothing already saved, leaves no temp file, and the retry succeeds.

Faults are injected into the exact system calls the store makes (ENOSPC, EACCES, EROFS, EIO,
a short write), and, where this machine allows ``mount -t tmpfs``, produced for real by a
full and by a read-only file system.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

import pytest

from steer_tui.core.session_errors import SaveError
from steer_tui.core.store import load_tree

from .conftest import build_session

FAULTS = [
    ("replace", errno.ENOSPC, "no space left on device"),
    ("replace", errno.EROFS, "read-only file system"),
    ("open", errno.EACCES, "Permission denied"),
    ("fsync", errno.EIO, "Input/output error"),
    ("write", errno.ENOSPC, "no space left on device"),  # after a partial write
]


@contextmanager
def failing(monkeypatch, call: str, err: int, under: Path):
    """Make ``os.<call>`` fail with ``err`` for files below ``under`` (fds: any fd opened
    for a path below it)."""
    real = getattr(os, call)
    fds: set[int] = set()
    short: set[int] = set()
    real_open = os.open

    def tracking_open(path, flags, *a, **k):
        fd = real_open(path, flags, *a, **k)
        if str(path).startswith(str(under)):
            fds.add(fd)
        return fd

    def boom(*args, **kwargs):
        first = args[0]
        ours = (isinstance(first, int) and first in fds) or (not isinstance(first, int) and str(first).startswith(str(under)))
        if not ours:
            return real(*args, **kwargs)
        if call == "write" and first not in short:  # a short write first, then the disk is full
            short.add(first)
            return real(first, bytes(args[1])[: max(1, len(args[1]) // 2)])
        raise OSError(err, os.strerror(err), str(first))

    if call != "open":
        monkeypatch.setattr(os, "open", tracking_open)
    monkeypatch.setattr(os, call, boom)
    try:
        yield
    finally:
        monkeypatch.setattr(os, call, real)
        monkeypatch.setattr(os, "open", real_open)


def _tmp_files(d: Path) -> list[Path]:
    return [p for p in d.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize("call,err,words", FAULTS, ids=[f"{c}-{errno.errorcode[e]}" for c, e, _ in FAULTS])
def test_failed_save_keeps_data_and_retry_succeeds(tmp_path, monkeypatch, call, err, words):
    s = build_session(tmp_path / "store")
    path = s.store.task_path(s.task_id)
    before = path.read_bytes()
    n_nodes = len(s.tree.nodes)
    with failing(monkeypatch, call, err, path.parent):
        n = len(s.response_tokens)
        with pytest.raises(SaveError) as ei:
            s.rollback(n - 3)
        assert str(path) in str(ei.value) and words.lower() in str(ei.value).lower()
        with pytest.raises(SaveError):
            s.correct(" Fig 🍐")  # the user keeps working; each save is retried and fails
        assert s.dirty
        steer = s.tree.node(s.end)
        assert steer.is_steer and steer.text == " Fig 🍐"
        assert len(s.tree.nodes) == n_nodes + 2  # the split tail and the steer, in memory
        assert path.read_bytes() == before  # nothing already saved is damaged
        assert not _tmp_files(path.parent)  # no temp file left behind
    s.save()  # the retry
    assert not s.dirty
    again = load_tree(path)
    assert again.node(steer.id).text == " Fig 🍐" and again.node(steer.id).replaces == steer.replaces
    assert json.loads(path.read_text(encoding="utf-8"))["nodes"] == [n.to_dict() for n in s.tree.nodes]
    s.close()


def test_failed_save_at_generation_end_keeps_tokens(tmp_path, monkeypatch):
    s = build_session(tmp_path / "store", steers=0)
    path = s.store.task_path(s.task_id)
    before = path.read_bytes()
    s.resample()
    got = []
    with failing(monkeypatch, "replace", errno.ENOSPC, path.parent):
        with pytest.raises(SaveError):
            for tok in s.generate(max_tokens=5):
                got.append(tok.id)
        assert path.read_bytes() == before
    assert got and s.tree.node(s.end).tokens == got
    s.save()
    assert load_tree(path).node(s.end).tokens == got
    s.close()


# ------------------------------------------------------------------ real file systems


@pytest.fixture
def tiny_tmpfs(tmp_path):
    """A 256 KiB tmpfs (skipped where mounting is not allowed)."""
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("needs root to mount a tmpfs")
    mnt = tmp_path / f"tmpfs-{uuid.uuid4().hex[:6]}"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"mount -t tmpfs not allowed here: {r.stderr.decode(errors='replace').strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_full_disk_for_real(tiny_tmpfs):
    s = build_session(tiny_tmpfs / "store")
    path = s.store.task_path(s.task_id)
    before = path.read_bytes()
    ballast = tiny_tmpfs / "ballast"
    with open(ballast, "wb", buffering=0) as fh:  # fill the file system
        try:
            while True:
                fh.write(b"\0" * 4096)
                fh.flush()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    with pytest.raises(SaveError, match="no space left on device"):
        s.rollback(len(s.response_tokens) - 3)
    with pytest.raises(SaveError):
        s.correct(" Quince")
    assert path.read_bytes() == before and not _tmp_files(path.parent)
    ballast.unlink()
    s.save()
    assert load_tree(path).node(s.end).text == " Quince"
    s.close()


def test_read_only_store_for_real(tiny_tmpfs):
    """A store on a read-only file system: opening a task to edit it is refused with a clear
    message (the lock cannot be created); read-only viewing, list and show still work.
    (Saves failing with EROFS mid-session are covered by the injected faults above: a file
    system with a session's lock open for writing cannot be remounted read-only.)"""
    from steer_tui.core.fake_engine import FakeEngine
    from steer_tui.core.session import Session
    from steer_tui.core.store import StoreError

    from .conftest import assert_user_error, run_cli

    store = tiny_tmpfs / "store"
    with build_session(store) as s:
        tid, n_steers = s.task_id, len(s.tree.steers())
    path = s.store.task_path(tid)
    before = path.read_bytes()
    r = subprocess.run(["mount", "-o", "remount,ro", str(tiny_tmpfs)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot remount read-only: {r.stderr.decode(errors='replace').strip()}")
    try:
        with pytest.raises(StoreError, match="Read-only file system") as ei:
            Session.open(store=store, task_id=tid, model=FakeEngine())
        assert tid in str(ei.value)
        with Session.open(store=store, task_id=tid, model=FakeEngine(), read_only=True) as ro:
            assert len(ro.tree.steers()) == n_steers
        out = run_cli("list", "--store", str(store))
        assert out.returncode == 0 and tid in out.stdout
        assert run_cli("show", tid, "--store", str(store)).returncode == 0
        assert_user_error(run_cli("export", "--format", "sft", "--out", str(store / "x.jsonl"), "--store", str(store)), "x.jsonl")
        assert path.read_bytes() == before
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(tiny_tmpfs)], check=True)


# ------------------------------------------------------------------ the app


async def test_app_shows_save_error_keeps_data_and_retries(tmp_path, monkeypatch):
    from steer_tui.core.fake_engine import FakeEngine
    from steer_tui.ui.app import make_app
    from steer_tui.ui.config import UIConfig
    from steer_tui.ui.session_factory import SessionFactory

    store = tmp_path / "store"
    factory = SessionFactory(store=store, engine=FakeEngine(), sampling={"temperature": 0, "seed": 7, "max_tokens": 30}, annotator="t")
    app = make_app(session_factory=factory, config=UIConfig(annotator="t"), prompt="fruits")
    async with app.run_test(size=(100, 30)) as pilot:

        async def until(cond, what: str, timeout: float = 20.0) -> None:
            deadline = time.monotonic() + timeout
            while not cond():
                assert time.monotonic() < deadline, f"timed out waiting for {what}"
                await pilot.pause(0.02)

        def idle() -> bool:
            s = app.session_screen
            return bool(s and s.session and not s.generating and not s.busy and s.status.state not in ("loading", "streaming"))

        await until(idle, "the first answer")
        scr = app.session_screen
        scr.save_retry_seconds = 0.1  # the app's timer, shortened (5 s in use)
        path = scr.session.store.task_path(scr.session.task_id)
        before = path.read_bytes()
        with failing(monkeypatch, "replace", errno.ENOSPC, path.parent):
            await pilot.press("d")  # accept: a save
            await until(lambda: "save failed" in scr.status.save_state, "the failed save")
            msgs = [n.message for n in app._notifications]
            assert any("no space left on device" in m and str(path) in m for m in msgs), msgs
            assert scr.session.tree.accepted and path.read_bytes() == before
            # the timer retries while the disk is full: each retry fails the same way, nothing is written
            n_failed = sum("no space left on device" in n.message for n in app._notifications)
            await until(lambda: sum("no space left on device" in n.message for n in app._notifications) > n_failed,
                        "a retry by the timer")
            assert path.read_bytes() == before and not _tmp_files(path.parent)
        # the disk has room again: the next retry saves
        await until(lambda: scr.status.save_state == "saved", "the retry that succeeds")
        await until(lambda: "Saved after retrying." in [n.message for n in app._notifications], "the notice")
        assert load_tree(path).accepted == scr.session.tree.accepted
    factory.close()
