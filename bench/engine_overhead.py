"""Session.generate throughput vs a bare llama-cpp-python greedy loop.

Both run the same model with the same thread count on the same chat prompt, greedy, in
one process, interleaved token by token (session step, bare step, bare step, session
step, ...) with every step timed, so machine load affects both alike. The session run captures top-5 + log-probs for every token,
decodes text incrementally, appends to the tree and saves the file at the end; the bare
run is ``Llama.generate(temp=0)`` yielding ids only. Each repetition starts from the same
cached prompt (both sides re-evaluate only its last token).

    python bench/engine_overhead.py [--tokens 128] [--reps 5] [--model PATH.gguf]

Prints per-repetition tokens/s and the median ratio session/bare (target >= 0.95).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PROMPT = "Write a long, detailed story about a dragon who learns to bake bread."


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--model", default=None)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)

    import llama_cpp

    from steer_tui import Session
    from steer_tui.core.engine import open_engine
    from steer_tui.core.models import default_model_path

    model = Path(args.model) if args.model else default_model_path()
    engine = open_engine(model, n_ctx=2048, n_threads=args.threads)
    threads = engine.llm.context_params.n_threads
    bare = llama_cpp.Llama(str(model), n_ctx=2048, n_threads=threads, logits_all=False, verbose=False)

    store = tempfile.mkdtemp(prefix="steer-bench-")
    s = Session.create(store=store, prompt=PROMPT, model=engine, sampling={"temperature": 0, "seed": 1})
    prompt = s.prompt_tokens
    eos = set(engine.eos_ids)
    n = args.tokens

    def pair() -> tuple[int, float, int, float]:
        """One repetition: step the session and the bare loop alternately, one token each
        (alternating which goes first), timing every step, so load spikes hit both alike."""
        s.goto(None)
        s.resample()
        sg = iter(s.generate(max_tokens=n))
        bg = bare.generate(prompt, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0)
        st = bt = 0.0
        sc = bc = 0
        s_done = b_done = False
        i = 0
        while not (s_done and b_done):
            order = ("s", "b") if i % 2 == 0 else ("b", "s")
            for who in order:
                if who == "s" and not s_done:
                    t0 = time.perf_counter()
                    try:
                        next(sg)  # the step after the last token saves the tree: timed too
                        sc += 1
                    except StopIteration:
                        s_done = True
                    st += time.perf_counter() - t0
                elif who == "b" and not b_done:
                    t0 = time.perf_counter()
                    tok = next(bg)
                    bt += time.perf_counter() - t0
                    bc += 1
                    if bc >= n or tok in eos:
                        b_done = True
            i += 1
        return sc, st, bc, bt

    pair()  # warm-up: both sides cache the prompt once
    ratios, s_rates, b_rates = [], [], []
    print(f"model {model.name}, {threads} threads, {n} tokens per run, {args.reps} interleaved reps")
    for i in range(args.reps):
        sc, st, bc, bt = pair()
        sr, br = sc / st, bc / bt
        s_rates.append(sr)
        b_rates.append(br)
        ratios.append(sr / br)
        print(f"rep {i + 1}: session {sc} tok in {st:.3f}s = {sr:6.1f} tok/s | bare {bc} tok in {bt:.3f}s = {br:6.1f} tok/s | ratio {sr / br:.3f}")
    med = statistics.median(ratios)
    print(
        f"median session {statistics.median(s_rates):.1f} tok/s, bare {statistics.median(b_rates):.1f} tok/s; "
        f"ratio session/bare = {med:.3f} (target >= 0.95) {'OK' if med >= 0.95 else 'BELOW TARGET'}"
    )
    s.close()
    bare.close()
    engine.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
