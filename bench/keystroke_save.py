"""Keystroke latency while the task is being saved: saves in the job worker (the app as it
is) vs saves on the UI thread (the old way), side by side in one run.

Builds a long task with the tree API (``app_open.build_task``: 500 steers over 20,000
response tokens by default, top-5 per token, a multi-MB file), opens it in the headless
app (Textual ``run_test``) and, while a loop on the UI event loop keeps the session saving
(a new save whenever none is queued: real ``Store.save``, JSON + fsync + rename on the
real file), presses cursor keys at random moments. Latency is the time from posting the
key until its effect is on screen state: the cursor moved and the cursor info line shows
the new token. "UI thread" replays the same run with the job worker replaced by a call
on the UI thread (a monkeypatch; the code path the app had before saves moved off it).

    python bench/keystroke_save.py [--steers 500] [--tokens 20000] [--keys 200]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from app_open import build_task  # noqa: E402  (the same long task as the open benchmark)


class _Done:
    """A finished worker, for jobs run on the UI thread (what ``JobQueue.settle`` awaits)."""

    def __init__(self) -> None:
        from textual.worker import WorkerState

        self.state = WorkerState.SUCCESS

    async def wait(self) -> None:
        return None


@contextmanager
def saves_on_ui_thread():
    """Run the screen's jobs (saves among them) synchronously on the UI thread."""
    from steer_tui.core.session_errors import SessionErrors
    from steer_tui.ui.screens.session_work import SessionWork

    real = SessionWork._job_in_thread

    def on_ui_thread(self, job):
        try:
            job.result = job.fn()
        except SessionErrors as exc:
            job.error = exc
        self.post_message(self.JobDone(job))
        return _Done()

    SessionWork._job_in_thread = on_ui_thread  # type: ignore[method-assign]
    try:
        yield
    finally:
        SessionWork._job_in_thread = real  # type: ignore[method-assign]


def percentile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[max(0, min(len(s) - 1, round(q * (len(s) - 1))))]


async def measure(store: str, engine, task_id: str, keys: int, seed: int) -> tuple[list[float], int]:
    """Per-keystroke latencies (ms) while saving continuously; and how many saves ran."""
    from textual import events

    from steer_tui.ui.app import make_app
    from steer_tui.ui.config import UIConfig
    from steer_tui.ui.session_factory import SessionFactory
    from steer_tui.ui.widgets.status import CursorInfo

    rnd = random.Random(seed)
    factory = SessionFactory(store=store, engine=engine, sampling={"temperature": 0})
    app = make_app(session_factory=factory, config=UIConfig(), task_id=task_id, autostart=False)
    latencies: list[float] = []
    saves = 0
    async with app.run_test(size=(100, 30)) as pilot:
        while app.session_screen is None or app.session_screen.session is None or app.session_screen.status.state == "loading":
            await asyncio.sleep(0.02)
        scr = app.session_screen
        view, info = scr.view, scr.query_one(CursorInfo)
        view.focus()
        await pilot.press("home")
        await pilot.pause(0.05)
        running = True

        async def keep_saving() -> None:
            nonlocal saves
            while running:
                if not scr.jobs:
                    scr.saves.save()
                    saves += 1
                await asyncio.sleep(0.002)

        saver = asyncio.create_task(keep_saving())
        await asyncio.sleep(0.05)
        for i in range(keys):
            before = view.cursor
            key = "right" if before < 1 or (i % 2 == 0 and before < view.n_tokens) else "left"
            t0 = time.perf_counter()
            app.post_message(events.Key(key, None))
            while time.perf_counter() - t0 < 10:
                cur = view.cursor
                shown = info.info.plain if hasattr(info.info, "plain") else str(info.info)
                if cur != before and f"#{cur} " in shown:
                    break
                await asyncio.sleep(0.0002)
            else:
                raise RuntimeError(f"key {key!r} at token {before} showed no effect in 10 s")
            latencies.append((time.perf_counter() - t0) * 1000)
            await asyncio.sleep(rnd.uniform(0.0, 0.03))  # land at random moments of the saves
        running = False
        await saver
        await scr.shutdown()
    factory.close()
    return latencies, saves


def save_ms(store: str, engine, task_id: str, n: int = 3) -> float:
    """Median time of one real save of the task (load it once, save it ``n`` times)."""
    from steer_tui.core.store import Store

    st = Store(store)
    tree = st.load(task_id)
    times = []
    for _ in range(n):
        t = time.perf_counter()
        st.save(tree)
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


async def run(args) -> int:
    from steer_tui.core.fake_engine import FakeEngine

    engine = FakeEngine(n_ctx=max(65536, 2 * args.tokens))
    store = tempfile.mkdtemp(prefix="steer-bench-keys-")
    build_task(store, engine, "big", args.tokens, args.steers)
    size = (Path(store) / "tasks" / "big.json").stat().st_size
    one_save = save_ms(store, engine, "big")
    threaded, n_threaded = await measure(store, engine, "big", args.keys, args.seed)
    with saves_on_ui_thread():
        ui, n_ui = await measure(store, engine, "big", args.keys, args.seed)

    print(
        f"task: {args.steers} steers, {args.tokens} response tokens, {size / 1e6:.1f} MB; "
        f"one save (JSON + fsync + rename) {one_save:.1f} ms; {args.keys} cursor keys per run"
    )
    print(f"{'keystroke -> cursor info shown':34} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} {'saves':>6}")
    rows = (("saves in the job worker (now)", threaded, n_threaded), ("saves on the UI thread (before)", ui, n_ui))
    for name, xs, n in rows:
        print(f"{name:34} {percentile(xs, 0.5):8.2f} {percentile(xs, 0.99):8.2f} {max(xs):8.2f} {n:6d}")
    ratio = [percentile(ui, q) / max(1e-9, percentile(threaded, q)) for q in (0.5, 0.99)] + [max(ui) / max(1e-9, max(threaded))]
    print(f"{'ratio UI thread / job worker':34} {ratio[0]:8.1f}x {ratio[1]:7.1f}x {ratio[2]:7.1f}x")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steers", type=int, default=500)
    ap.add_argument("--tokens", type=int, default=20000)
    ap.add_argument("--keys", type=int, default=200)
    ap.add_argument("--seed", type=int, default=1)
    return asyncio.run(run(ap.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
