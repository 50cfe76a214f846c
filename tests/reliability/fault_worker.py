"""A scripted steering session that the crash tests run in a subprocess and SIGKILL.

    python tests/reliability/fault_worker.py MODE STORE TASK_ID SEED

MODE is ``fake`` (Session on the FakeEngine), ``real`` (Session on the bundled GGUF) or
``app`` (the Textual app driven headless by a pilot, on the FakeEngine). The worker opens
TASK_ID if it exists (a previous, killed worker created it) or creates it, then steers
forever: generate, roll back, correct (with emoji/RTL/combining text), pick, undo, redo,
accept. Every save goes through ``ReportingStore``, which prints one flushed line to
stdout just before the file is written and one just after ``save`` returned:

    BEGIN <sha256 of the bytes about to be written> <json: steers and node count>
    END <sha256>

A line the parent has read was written before the kill, so an ``END`` line proves the save
completed. Any exception other than the project's own refusals (SessionError) makes the
worker exit with status 3 and a traceback on stderr, which the parent reports as a bug.
``STEER_FAULT_SLOWFS=1`` adds a random 0-4 ms sleep to each fsync so kills land inside a
save more often (``STEER_FAULT_SLOWFS=MS``, a number above 1: 0-MS ms; the harness uses
that for the kills it aims at a save).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import sys
import time
import traceback
import zlib
from pathlib import Path

from steer_tui.core.store import Store, dumps_tree

CORRECTIONS = (
    " Banana",
    " pear 🍐 and 👩‍👩‍👧 family",
    " שלום עולם",  # RTL
    " e\u0301cole cafe\u0301",  # combining acute accents
    " [bold]not markup[/bold]",
    " \u202eevil\u202c",  # bidi override (data, never interpreted)
    " x" * 40,
)


def emit(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def snapshot(tree) -> dict:
    steers = {n.id: [n.replaces, zlib.crc32(json.dumps(tree.original_tokens(n.id)).encode())] for n in tree.nodes if n.is_steer}
    return {"steers": steers, "nodes": len(tree.nodes)}


class ReportingStore(Store):
    """A Store that reports the start and completion of every save on stdout."""

    def save(self, tree):  # type: ignore[override]
        data = dumps_tree(tree).encode("utf-8")
        sha = hashlib.sha256(data).hexdigest()
        emit(f"BEGIN {sha} {json.dumps(snapshot(tree), separators=(',', ':'))}")
        path = super().save(tree)
        emit(f"END {sha}")
        return path


def slow_fsync(max_ms: float = 4.0) -> None:
    real = os.fsync
    rng = random.Random(os.getpid())

    def fsync(fd: int) -> None:
        time.sleep(rng.random() * max_ms / 1000)
        real(fd)

    os.fsync = fsync  # type: ignore[assignment]


def unsafe_saves() -> None:
    """Negative control: replace the atomic save with a naive in-place write, slowly, so the
    harness can show that it does detect torn files (see test_harness_detects_torn_writes)."""
    import steer_tui.core.store as store_mod

    def naive_save(tree, path) -> None:
        data = dumps_tree(tree).encode("utf-8")
        with open(path, "wb") as fh:
            for i in range(0, len(data), 256):
                fh.write(data[i : i + 256])
                fh.flush()
                time.sleep(0.002)

    store_mod.save_tree = naive_save


def session_step(s, rng: random.Random) -> None:
    """One random steering action on a headless Session."""
    from steer_tui.core.session_errors import SessionError

    try:
        n = len(s.response_tokens)
        r = rng.random()
        if n > 150:
            s.rollback(rng.randint(0, 20))
        elif n == 0 or r < 0.35:
            for _ in s.generate(max_tokens=rng.randint(2, 10)):
                pass
        elif r < 0.72:
            s.rollback(rng.randint(max(0, n - 15), n - 1))
            s.correct(rng.choice(CORRECTIONS))
        elif r < 0.80:
            at = rng.randint(max(0, n - 15), n - 1)
            s.rollback(at)
            s.pick(rng.randrange(min(s.engine.n_vocab, 250)))
        elif r < 0.87:
            s.undo()
        elif r < 0.92:
            s.redo()
        elif r < 0.97:
            s.accept()
        else:
            s.resample()
            for _ in s.generate(max_tokens=rng.randint(2, 6)):
                pass
    except SessionError as exc:  # a refusal (e.g. context full) is fine; anything else is a bug
        emit(f"REFUSED {type(exc).__name__}: {str(exc)[:80]!r}")


def run_session(mode: str, store: Store, task_id: str, rng: random.Random) -> None:
    from steer_tui.core.session import Session

    if mode == "fake":
        from steer_tui.core.fake_engine import FakeEngine

        engine = FakeEngine()
    else:
        from steer_tui.core.engine import open_engine

        engine = open_engine(None, n_ctx=512, seed=1, n_threads=1)
    sampling = {"temperature": 0.9, "seed": rng.randrange(2**31), "max_tokens": 16}
    if store.exists(task_id):
        s = Session.open(store=store, task_id=task_id, model=engine, annotator="alice")
    else:
        s = Session.create(store=store, prompt="Give four examples of fruit.", model=engine, sampling=sampling,
                           task_id=task_id, annotator="alice")
    emit("READY")
    while True:
        session_step(s, rng)


def run_app(store: Store, task_id: str, rng: random.Random) -> None:
    import asyncio

    from textual.widgets import Input

    from steer_tui.core.fake_engine import FakeEngine
    from steer_tui.ui.app import make_app
    from steer_tui.ui.config import UIConfig
    from steer_tui.ui.session_factory import SessionFactory

    # no annotator: a queue line's "id" is then the task id as is (with an annotator the
    # app names queue tasks "<id>-<annotator>"), so the checker finds tasks/<task_id>.json
    factory = SessionFactory(store=store, engine=FakeEngine(), sampling={"temperature": 0.9, "seed": rng.randrange(2**31), "max_tokens": 12},
                             annotator=None)
    if store.exists(task_id):
        app = make_app(session_factory=factory, config=UIConfig(annotator=None), task_id=task_id)
    else:
        from steer_tui.core.tasks import TaskSpec

        app = make_app(session_factory=factory, config=UIConfig(annotator=None),
                       tasks=[TaskSpec(prompt="Give four examples of fruit.", id=task_id)])

    async def idle(pilot) -> None:
        while True:
            await pilot.pause(0.01)
            scr = app.session_screen
            if scr is not None and scr.status.state == "error":
                raise RuntimeError(f"app could not open the task: {scr.query_one('#prompt-line').render()}")
            if scr is not None and scr.session is not None and not scr.generating and not scr.busy and scr.status.state not in ("loading", "streaming"):
                return

    async def drive() -> None:
        async with app.run_test(size=(100, 30)) as pilot:
            await idle(pilot)
            emit("READY")
            while True:
                await idle(pilot)
                scr = app.session_screen
                n = scr.view.n_tokens
                r = rng.random()
                if n > 120:
                    scr.view.cursor = rng.randint(0, 10)
                    await pilot.press("enter")
                    scr.query_one(Input).value = "Short."
                    await pilot.press("enter")
                elif n == 0 or r < 0.2:
                    await pilot.press("r")
                elif r < 0.75:
                    scr.view.cursor = rng.randint(max(0, n - 12), n)
                    await pilot.press("enter")
                    text = rng.choice(CORRECTIONS)
                    if text.isascii() and len(text) < 12:
                        await pilot.press(*("space" if c == " " else c for c in text))
                    else:
                        scr.query_one(Input).value = text
                    await pilot.press("enter")
                elif r < 0.85:
                    await pilot.press("u")
                elif r < 0.9:
                    await pilot.press("U")
                else:
                    await pilot.press("d")

    asyncio.run(drive())


def main(argv: list[str]) -> int:
    mode, store_dir, task_id, seed = argv[1], argv[2], argv[3], int(argv[4])
    slowfs = float(os.environ.get("STEER_FAULT_SLOWFS") or 0)
    if slowfs:
        slow_fsync(4.0 if slowfs == 1 else slowfs)
    if os.environ.get("STEER_FAULT_UNSAFE") == "1":
        unsafe_saves()
    rng = random.Random(seed)
    store = ReportingStore(Path(store_dir))
    try:
        if mode == "app":
            run_app(store, task_id, rng)
        else:
            run_session(mode, store, task_id, rng)
    except BaseException:
        traceback.print_exc()
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
