"""The model-family table of docs/training.md: for tiny random models of every family users
bring (tests/train/families.py: llama, llama3 rope scaling, mistral, qwen2, qwen3, gemma2,
gemma3, phi3, and the MoE mixtral that must be refused), converted to f32 GGUFs by llama.cpp's
own converter, it measures

* loader: max |log p(llama.cpp) - log p(training model)| of the next token at every position
  of the check text, the training model loaded from the GGUF by steer-train's loader;
* export (GGUF / HF dir): a random nonzero LoRA trained on the GGUF-loaded model / on the
  original HF directory, exported to adapter.gguf: max |delta llama.cpp - delta PEFT|;
* wrong q/k permutation: the same export with the rotary row permutation inverted (must fail);

and prints the markdown table. Each figure is what ``steer-train check-model MODEL.gguf
[--adapter DIR]`` prints for that model.

    python bench/families.py [--out DIR] [FAMILY ...]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("families", nargs="*")
    ap.add_argument("--out", help="work directory (default: a temp dir)")
    args = ap.parse_args()
    work = Path(args.out or tempfile.mkdtemp(prefix="steer-families-"))
    os.environ.setdefault("STEER_CACHE", str(work / "cache"))
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    from tests.train.families import FAMILIES, build, measure
    from train.check import THRESHOLD

    names = args.families or list(FAMILIES)
    t0 = time.time()
    paths = build(work / "models", names)
    rows = []
    for name in names:
        t = time.time()
        r = measure(name, paths[name], work / "adapters")
        r["seconds"] = time.time() - t
        rows.append((name, r))
        print(f"{name}: {r}", file=sys.stderr, flush=True)
    print(f"\n| family (tiny, f32 GGUF) | what it exercises | loader vs llama.cpp | export from GGUF | export from HF dir "
          f"| wrong q/k permutation | status |")
    print("|---|---|---|---|---|---|---|")
    for name, r in rows:
        what = FAMILIES[name].what
        if "refused" in r:
            msg = r["refused"].split(": ", 2)[-1] if r["refused"].count(": ") >= 2 else r["refused"]
            print(f"| {name} | {what} | - | - | - | - | refused: {msg.split(':')[0]} |")
            continue
        ok = max(r["loader"], r["export_gguf"], r["export_dir"]) <= THRESHOLD and r["wrong_permutation"] > THRESHOLD
        print(f"| {name} | {what} | {r['loader']:.1e} | {r['export_gguf']:.1e} (effect {r['effect']:.2f}) "
              f"| {r['export_dir']:.1e} (effect {r['effect_dir']:.2f}) | {r['wrong_permutation']:.2f} "
              f"| {'matches' if ok else 'MISMATCH'} |")
    print(f"\n{len(rows)} families in {time.time() - t0:.0f} s; threshold {THRESHOLD} nats; "
          f"{rows[0][1].get('tokens', '?')} tokens of the check text", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
