"""Time to first token after rolling back 50 tokens in a 1,500-token context, vs a cold prefill.

A session holds a 1,500-token context (prompt + a long appended text, evaluated as if the
model had just written it). Each repetition:

* warm: ``session.rollback(len - 50)`` then time ``rollback`` + the first token of
  ``session.generate`` (the engine re-evaluates only the last kept token);
* cold: a second engine with an empty KV cache generates the first token after the same
  1,450-token context (full prefill).

Repetitions are interleaved (warm, cold, warm, cold...). Between repetitions the session's
engine is brought back to holding the whole 1,500 tokens (untimed), as after generating them.

    python bench/rollback.py [--context 1500] [--back 50] [--reps 5] [--model PATH.gguf]

Prints each pair and the median ratio warm/cold (target <= 0.05), plus the evaluated-token
counts that explain it.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TEXT = (
    "The river ran past the old mill, where the miller's daughter counted sacks of grain "
    "and wrote the numbers in a ledger that had belonged to her grandmother. "
)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--context", type=int, default=1500)
    ap.add_argument("--back", type=int, default=50)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--model", default=None)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)

    from steer_tui import Session
    from steer_tui.core.engine import open_engine
    from steer_tui.core.sampling import Sampling
    from steer_tui.core.models import default_model_path

    model = Path(args.model) if args.model else default_model_path()
    n_ctx = max(2048, args.context + 64)
    engine = open_engine(model, n_ctx=n_ctx, n_threads=args.threads)
    cold = open_engine(model, n_ctx=n_ctx, n_threads=args.threads)
    greedy = Sampling(temperature=0)

    s = Session.create(
        store=tempfile.mkdtemp(prefix="steer-bench-"),
        prompt="Continue the story.",
        model=engine,
        sampling={"temperature": 0, "seed": 1},
    )
    need = args.context - len(s.prompt_tokens)
    body = engine.tokenize(TEXT * (need // 20 + 2))[:need]
    s.correct(engine.detokenize(body))  # one long appended node, scored in one batch
    full_end = s.end
    full = s.context_tokens
    n_resp = len(s.response_tokens)
    keep = n_resp - args.back
    context = full[: len(full) - args.back]
    print(
        f"model {model.name}; context {len(full)} tokens (prompt {len(s.prompt_tokens)}), "
        f"roll back {args.back} -> first token after {len(context)} tokens; {args.reps} interleaved reps"
    )

    warm_t, cold_t, ratios = [], [], []
    for i in range(args.reps):
        # as after generating the whole context: the cache holds all of it
        s.goto(s.tree.split_chain(full_end)[-1].id)
        engine.logits(full)
        before = engine.n_evaluated
        t0 = time.perf_counter()
        s.rollback(keep)
        tok = next(iter(s.generate(max_tokens=1)))
        tw = time.perf_counter() - t0
        warm_eval = engine.n_evaluated - before

        cold.reset()
        cb = cold.n_evaluated
        t0 = time.perf_counter()
        ctok = next(iter(cold.generate(context, greedy, max_tokens=1)))
        tc = time.perf_counter() - t0
        cold_eval = cold.n_evaluated - cb
        assert tok.id == ctok.id, "warm and cold disagree on the first token"

        warm_t.append(tw)
        cold_t.append(tc)
        ratios.append(tw / tc)
        print(
            f"rep {i + 1}: rollback+first token {tw * 1000:7.1f} ms ({warm_eval} tokens evaluated) | "
            f"cold prefill+first token {tc * 1000:7.1f} ms ({cold_eval} tokens evaluated) | ratio {tw / tc:.4f}"
        )
    med = statistics.median(ratios)
    print(
        f"median warm {statistics.median(warm_t) * 1000:.1f} ms, cold {statistics.median(cold_t) * 1000:.1f} ms; "
        f"ratio warm/cold = {med:.4f} (target <= 0.05) {'OK' if med <= 0.05 else 'ABOVE TARGET'}"
    )
    s.close()
    engine.close()
    cold.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
