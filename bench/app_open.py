"""Time to open a long task in the app (20,000 response tokens, 500 steers) and to scroll it.

Builds the task file with the tree API (realistic: model nodes with log-probs and top-5,
a rejected sibling per steer, tokens from the model's own tokenizer), then, in one run,
opens it in the headless app and a tiny task for comparison. "Open" is from app start to
the token view having drawn the task's text (the session is loaded in a worker thread, the
path laid out and the visible lines rendered). Scrolling: page-down presses over the
whole text, key -> lines drawn. Target: open < 1 s.

    python bench/app_open.py [--tokens 20000] [--steers 500] [--model PATH.gguf | --fake]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TEXT = (
    "The baker opened the shop before dawn, lit the ovens and measured flour for the first "
    "loaves of the day, while the dragon watched from the doorway, curious and careful. "
)


def build_task(store, engine, task_id: str, n_tokens: int, n_steers: int) -> None:
    from steer_tui.core.store import Store
    from steer_tui.core.tree import Node, new_tree

    ids = engine.tokenize(TEXT * 40)
    prompt = engine.tokenize("<|im_start|>user\nTell a long story.<|im_end|>\n<|im_start|>assistant\n", special=True)
    describe = getattr(engine, "describe", None)
    model = describe() if describe else {"name": engine.name}
    tree = new_tree(
        task_id=task_id,
        title=f"{n_tokens} tokens, {n_steers} steers",
        model=model,
        prompt={"mode": "raw", "text": "", "tokens": prompt},
        sampling={"temperature": 0.8, "top_p": 0.95, "top_k": 40, "min_p": 0.05, "repeat_penalty": 1.0, "seed": 1, "max_tokens": 512},
    )
    per = n_tokens // max(1, n_steers)
    human_len = 2
    k = 0

    def take(n: int) -> list[int]:
        nonlocal k
        out = [ids[(k + i) % len(ids)] for i in range(n)]
        k += n
        return out

    def model_node(parent, toks, end):
        return Node(
            id=tree.new_id(), parent=parent, author="model", kind="generated", tokens=toks,
            text=engine.detokenize(toks) if hasattr(engine, "detokenize") else "",
            logprobs=[-0.7] * len(toks), top=[[[t, -0.7], [1, -2.0], [2, -3.0], [3, -4.0], [4, -5.0]] for t in toks], end=end,
        )

    parent = None
    for _ in range(n_steers):
        m = tree.add(model_node(parent, take(per - human_len), "cut"))
        rejected = tree.add(model_node(m.id, take(10), "paused"))
        h_toks = take(human_len)
        h = tree.add(
            Node(
                id=tree.new_id(), parent=m.id, author="human", kind="correction", tokens=h_toks,
                text=engine.detokenize(h_toks) if hasattr(engine, "detokenize") else "", logprobs=[-3.0] * human_len,
                top=[[[t, -3.0]] for t in h_toks], replaces=rejected.id, annotator="bench",
            )
        )
        parent = h.id
    last = tree.add(model_node(parent, take(1), "paused"))
    tree.extra["session"] = {"end": last.id, "cut": None}
    Store(store).save(tree)


async def open_in_app(store, engine, task_id: str, expect_tokens: int, pages: int):
    from textual import events

    from steer_tui.ui.app import make_app

    from steer_tui.ui.session_factory import SessionFactory
    from steer_tui.ui.config import UIConfig
    from steer_tui.ui.widgets.token_view import TokenView

    drawn: list[float] = []
    orig = TokenView.render_line

    def timed(self, y):
        strip = orig(self, y)
        if self.n_tokens >= expect_tokens:
            drawn.append(time.perf_counter())
        return strip

    TokenView.render_line = timed  # type: ignore[method-assign]
    try:
        factory = SessionFactory(store=store, engine=engine, sampling={"temperature": 0})
        app = make_app(session_factory=factory, config=UIConfig(), task_id=task_id, autostart=False)
        t0 = time.perf_counter()
        scroll: list[float] = []
        async with app.run_test(size=(100, 30)) as pilot:
            while not drawn:
                await asyncio.sleep(0.05)  # the time comes from the render hook, not this poll
            opened = drawn[0] - t0
            view = app.session_screen.view
            view.focus()
            await pilot.press("home")
            await pilot.pause(0.05)
            for _ in range(pages):
                drawn.clear()
                t1 = time.perf_counter()
                app.post_message(events.Key("pagedown", None))
                while not drawn:
                    await asyncio.sleep(0.0005)
                scroll.append((drawn[0] - t1) * 1000)
                await asyncio.sleep(0.01)
            lines = view.line_count()
            await app.session_screen.shutdown()
    finally:
        TokenView.render_line = orig  # type: ignore[method-assign]
    return opened, scroll, lines


async def run(args) -> int:
    if args.fake:
        from steer_tui.core.fake_engine import FakeEngine

        engine = FakeEngine(n_ctx=65536)
    else:
        from steer_tui.core.engine import open_engine
        from steer_tui.core.models import default_model_path

        engine = open_engine(Path(args.model) if args.model else default_model_path(), n_ctx=512)
    store = tempfile.mkdtemp(prefix="steer-bench-open-")
    t = time.perf_counter()
    build_task(store, engine, "big", args.tokens, args.steers)
    build_task(store, engine, "tiny", 40, 2)
    size = (Path(store) / "tasks" / "big.json").stat().st_size
    print(f"built the tasks in {time.perf_counter() - t:.2f}s (big: {size / 1e6:.1f} MB)")

    from steer_tui.core.store import Store

    t = time.perf_counter()
    tree = Store(store).load("big")
    t_load = time.perf_counter() - t
    n_resp = len(tree.path_tokens(tree.extra["session"]["end"]))
    n_steers = len(tree.steers())

    tiny_open, _, _ = await open_in_app(store, engine, "tiny", 40, 0)
    big_open, scroll, lines = await open_in_app(store, engine, "big", n_resp, args.pages)
    tiny_open2, _, _ = await open_in_app(store, engine, "tiny", 40, 0)
    base = min(tiny_open, tiny_open2)
    print(f"engine: {engine.name}")
    print(f"task: {n_resp} response tokens, {n_steers} steers, {len(tree.nodes)} nodes, {lines} lines at 100 columns")
    print(f"load + validate the file alone        : {t_load * 1000:7.0f} ms")
    print(f"open the big task in the app          : {big_open * 1000:7.0f} ms   (target < 1000 ms)")
    print(f"open a 40-token task (app start cost) : {base * 1000:7.0f} ms")
    print(f"ratio big / tiny                      : {big_open / base:7.2f}")
    print(
        f"page-down -> drawn over the big task  : p50 {statistics.median(scroll):.1f} ms  "
        f"p99 {sorted(scroll)[max(0, round(0.99 * (len(scroll) - 1)))]:.1f} ms  over {len(scroll)} pages"
    )
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=20000)
    ap.add_argument("--steers", type=int, default=500)
    ap.add_argument("--pages", type=int, default=60)
    ap.add_argument("--model", default=None)
    ap.add_argument("--fake", action="store_true")
    return asyncio.run(run(ap.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
