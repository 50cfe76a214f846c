"""Streaming through the running app vs Session.generate alone, and keystroke latency.

1. Throughput: the headless app (``run_test``) streams ``--tokens`` greedy tokens into the
   token view; the same Session then generates the same tokens with no UI. Repetitions are
   interleaved (app, bare, bare, app, ...), each from the same cached prompt, on the same
   engine, so machine load hits both alike. App time runs from the key that starts the
   stream to the moment the last token is in the view. Target: ratio >= 0.9.
2. Latency while streaming: during a long stream, ``p`` (toggle probability colours) is
   pressed ``--presses`` times at random intervals; latency = key event posted -> the token
   view has rendered a line in the new state (what the terminal would be sent next).
   Target: p99 < 50 ms.

    python bench/app_stream.py [--tokens 128] [--reps 4] [--presses 100] [--model PATH.gguf] [--threads N]
    python bench/app_stream.py --fake-ms 25     # control: no CPU contention, the UI's own cost
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PROMPT = "Write a long, detailed story about a dragon who learns to bake bread."


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))]


async def run(args: argparse.Namespace) -> int:
    from textual import events

    from steer_tui.ui.app import make_app

    from steer_tui.ui.session_factory import SessionFactory
    from steer_tui.ui.config import UIConfig
    from steer_tui.ui.widgets.token_view import TokenView

    if args.fake_ms is not None:
        from steer_tui.core.fake_engine import FakeEngine

        class SleepyEngine(FakeEngine):
            """The FakeEngine taking ``fake_ms`` per generated token, in a sleep that
            releases the GIL as llama.cpp's decode does: what is left of the gap is the UI."""

            def _decode(self, tokens, n_past, all_logits):
                if len(tokens) < 4:
                    time.sleep(args.fake_ms / 1000 * len(tokens))
                return super()._decode(tokens, n_past, all_logits)

        engine = SleepyEngine([PROMPT * 50], n_ctx=8192, name=f"fake ({args.fake_ms:g} ms/token)")
    else:
        from steer_tui.core.engine import open_engine
        from steer_tui.core.models import default_model_path

        engine = open_engine(Path(args.model) if args.model else default_model_path(), n_ctx=4096, n_threads=args.threads)

    # instrument the view: when did tokens arrive, when was a line drawn in which state
    last_append = [0.0]
    orig_append = TokenView.append

    def timed_append(self, pieces):
        orig_append(self, pieces)
        last_append[0] = time.perf_counter()

    TokenView.append = timed_append  # type: ignore[method-assign]
    drawn: dict[bool, float] = {}
    orig_render_line = TokenView.render_line

    def timed_render_line(self, y):
        strip = orig_render_line(self, y)
        drawn.setdefault(self.prob_colors, time.perf_counter())
        return strip

    TokenView.render_line = timed_render_line  # type: ignore[method-assign]

    store = tempfile.mkdtemp(prefix="steer-bench-app-")
    factory = SessionFactory(store=store, engine=engine, sampling={"temperature": 0, "seed": 1, "max_tokens": args.tokens})
    app = make_app(session_factory=factory, config=UIConfig(), prompt=PROMPT, autostart=False)
    app_tps: list[float] = []
    bare_tps: list[float] = []
    latencies: list[float] = []
    async with app.run_test(size=(100, 30)) as pilot:
        while app.session_screen is None or app.session_screen.session is None:
            await pilot.pause(0.01)
        scr = app.session_screen
        s = scr.session

        async def app_once(max_tokens: int | None = None) -> float:
            s.goto(None)
            s.resample()
            scr._refresh_all()
            await pilot.pause()
            t0 = time.perf_counter()
            scr.start_generation()
            while scr.generating:
                await asyncio.sleep(0.05)  # the end time comes from the view, not this poll
            n = scr.view.n_tokens
            return n / (last_append[0] - t0)

        def bare_once() -> float:
            s.goto(None)
            s.resample()
            t0 = time.perf_counter()
            n = sum(1 for _ in s.generate())
            return n / (time.perf_counter() - t0)

        await app_once()  # warm-up: caches the prompt
        for rep in range(args.reps):
            order = (app_once, bare_once) if rep % 2 == 0 else (bare_once, app_once)
            for fn in order:
                if fn is app_once:
                    app_tps.append(await app_once())
                else:
                    bare_tps.append(bare_once())
            print(f"rep {rep + 1}: app {app_tps[-1]:7.1f} tok/s   session alone {bare_tps[-1]:7.1f} tok/s", flush=True)

        # latency while streaming: a long stream, keys at random intervals
        s.goto(None)
        s.resample()
        s.sampling = s.sampling.replace(max_tokens=100000)
        scr._refresh_all()
        scr.start_generation()
        await asyncio.sleep(0.3)
        rnd = random.Random(0)
        for _ in range(args.presses):
            if not scr.generating:
                s.goto(None)
                s.resample()
                scr.start_generation()
                await asyncio.sleep(0.1)
            target = not scr.view.prob_colors
            drawn.pop(target, None)
            t0 = time.perf_counter()
            app.post_message(events.Key("p", "p"))
            while target not in drawn:
                await asyncio.sleep(0.0005)
            latencies.append((drawn[target] - t0) * 1000)
            await asyncio.sleep(rnd.uniform(0.02, 0.08))
        streamed = scr.view.n_tokens
        await scr.pause()

    ratio = statistics.median(app_tps) / statistics.median(bare_tps)
    pair = statistics.median(a / b for a, b in zip(app_tps, bare_tps))
    print()
    threads = getattr(getattr(getattr(engine, "llm", None), "context_params", None), "n_threads", "?")
    print(f"engine: {engine.name}, {threads} threads; {args.tokens} tokens x {args.reps} reps, interleaved")
    print(f"tokens/s through the app (median)   : {statistics.median(app_tps):8.1f}")
    print(f"tokens/s Session.generate (median)  : {statistics.median(bare_tps):8.1f}")
    print(f"ratio app / session                 : {ratio:8.3f}   (target >= 0.9)")
    print(f"median of per-repetition ratios     : {pair:8.3f}")
    print(
        f"keystroke -> screen while streaming : p50 {pct(latencies, 50):.1f} ms  p99 {pct(latencies, 99):.1f} ms"
        f"  max {max(latencies):.1f} ms  over {len(latencies)} keys ({streamed} tokens streamed)   (target p99 < 50 ms)"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--reps", type=int, default=4)
    ap.add_argument("--presses", type=int, default=100)
    ap.add_argument("--model", default=None)
    ap.add_argument("--threads", type=int, default=None, help="llama.cpp threads (default: the engine's choice)")
    ap.add_argument(
        "--fake-ms", type=float, default=None,
        help="control run: a fake engine that sleeps this long per token (GIL released), so only the UI's cost remains",
    )
    return asyncio.run(run(ap.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
