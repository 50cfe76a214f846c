"""Session.generate throughput vs a bare llama-cpp-python greedy loop.

Both run the same model with the same thread count on the same chat prompt, greedy, in
one process, interleaved token by token (round-robin, rotating who goes first) with every
step timed, so machine load affects all alike. A third column runs the engine alone
(``engine.generate`` with top-5 capture, no tree/text/saving) on its own context, to show
where any overhead comes from. The session run captures top-5 + log-probs for every token,
decodes text incrementally, appends to the tree and saves the file at the end; the bare
run is ``Llama.generate(temp=0)`` yielding ids only. Each repetition starts from the same
cached prompt (both sides re-evaluate only its last token).

    python bench/engine_overhead.py [--tokens 192] [--reps 7] [--model PATH.gguf]

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
    ap.add_argument("--tokens", type=int, default=192)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--model", default=None)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)

    from steer_tui.core.llama_load import load_llama

    from steer_tui import Session
    from steer_tui.core.engine import open_engine
    from steer_tui.core.sampling import Sampling
    from steer_tui.core.models import default_model_path

    model = Path(args.model) if args.model else default_model_path()
    engine = open_engine(model, n_ctx=2048, n_threads=args.threads)
    threads = engine.llm.context_params.n_threads
    bare = load_llama(model, n_ctx=2048, n_threads=threads, logits_all=False, verbose=False)

    store = tempfile.mkdtemp(prefix="steer-bench-")
    s = Session.create(store=store, prompt=PROMPT, model=engine, sampling={"temperature": 0, "seed": 1})
    prompt = s.prompt_tokens
    eos = set(engine.eos_ids)
    n = args.tokens

    engine2 = open_engine(model, n_ctx=2048, n_threads=threads)  # engine alone, own KV cache
    greedy = Sampling(temperature=0)

    def rep() -> dict[str, tuple[int, float]]:
        """One repetition: step the session, the bare engine-only loop and the bare
        llama-cpp-python loop round-robin, one token each (rotating who goes first), timing
        every step, so load spikes hit all alike. Returns {name: (tokens, seconds)}."""
        s.goto(None)
        s.resample()
        gens = {
            "session": (t.id for t in s.generate(max_tokens=n)),
            "engine": (st.id for st in engine2.generate(prompt, greedy, max_tokens=n, top_k=5)),
            "bare": bare.generate(prompt, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0),
        }
        out = {k: [0, 0.0] for k in gens}
        live = list(gens)
        i = 0
        while live:
            order = live[i % len(live) :] + live[: i % len(live)]
            for name in order:
                t0 = time.perf_counter()
                try:
                    tok = next(gens[name])  # the session's step after its last token saves: timed
                except StopIteration:
                    out[name][1] += time.perf_counter() - t0
                    if name == "session":
                        save_times.append(time.perf_counter() - t0)
                    live.remove(name)
                    continue
                out[name][1] += time.perf_counter() - t0
                out[name][0] += 1
                if name == "bare" and (out[name][0] >= n or tok in eos):
                    live.remove(name)
            i += 1
        return {k: (c, t) for k, (c, t) in out.items()}

    save_times: list[float] = []
    rep()  # warm-up: every side caches the prompt once
    save_times.clear()
    rates: dict[str, list[float]] = {"session": [], "engine": [], "bare": []}
    print(f"model {model.name}, {threads} threads, {n} tokens per run, {args.reps} interleaved reps")
    for i in range(args.reps):
        r = rep()
        for k, (c, t) in r.items():
            rates[k].append(c / t)
        print(
            f"rep {i + 1}: "
            + " | ".join(f"{k} {c} tok {c / t:6.1f} tok/s" for k, (c, t) in r.items())
            + f" | session/bare {rates['session'][-1] / rates['bare'][-1]:.3f}"
        )
    ratio = statistics.median(a / b for a, b in zip(rates["session"], rates["bare"]))
    eng = statistics.median(a / b for a, b in zip(rates["engine"], rates["bare"]))
    print(
        f"median tok/s: session {statistics.median(rates['session']):.1f}, engine {statistics.median(rates['engine']):.1f}, "
        f"bare {statistics.median(rates['bare']):.1f}; engine/bare = {eng:.3f}"
    )
    print(f"the session's final atomic save (fsync) took a median {statistics.median(save_times) * 1000:.1f} ms per run")
    print(f"ratio session/bare = {ratio:.3f} (target >= 0.95) {'OK' if ratio >= 0.95 else 'BELOW TARGET'}")
    engine2.close()
    s.close()
    bare.close()
    engine.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
