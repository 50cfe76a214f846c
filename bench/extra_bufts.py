"""What turning llama.cpp's extra buffer types off costs: prefill and generation speed of a
model with ``use_extra_bufts`` on vs off, side by side in one run.

Each measurement runs in its own child process (a crash with extra buffer types on, as on
AMX Xeons, is a result: the table says "crashed (SIGSEGV)"), the two modes interleaved
rep by rep so both see the same machine load; medians are printed with the on/off ratio.

    python bench/extra_bufts.py                          # the bundled model, this build
    python bench/extra_bufts.py --model other.gguf --reps 5 --threads 2
    python bench/extra_bufts.py --pythonpath DIR         # another llama-cpp-python build
                                                         # (e.g. one compiled without AMX)

``--quantize q4_0`` first writes a Q4_0 copy of the model with llama.cpp's quantizer (Q4_0
is a type the CPU weight-repacking buffer type handles; the bundled Q4_1 is not).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TEXT = (
    "Steering a language model means watching it write, stopping it where it goes off track, "
    "rolling back to the exact token and typing a short correction. "
)


def child(args: argparse.Namespace) -> int:
    import llama_cpp

    from steer_tui.core.llama_load import load_llama

    t0 = time.perf_counter()
    llm = load_llama(args.model, extra_bufts=args.child == "on", n_ctx=2048, n_batch=512,
                     n_threads=args.threads, n_threads_batch=args.threads, logits_all=False, verbose=False)
    load = time.perf_counter() - t0
    tokens = llm.tokenize((TEXT * 40).encode(), add_bos=True)[: args.prompt_tokens]
    llm.eval(tokens[:8])  # warm up
    llm.reset()
    llm._ctx.kv_cache_clear() if hasattr(llm._ctx, "kv_cache_clear") else None
    t0 = time.perf_counter()
    llm.eval(tokens)
    prefill = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(args.gen_tokens):
        llm.eval([int(llm.scores[llm.n_tokens - 1].argmax())])
    gen = time.perf_counter() - t0
    info = llama_cpp.llama_print_system_info().decode(errors="replace")
    print(json.dumps({"load_s": load, "prefill_tok_s": len(tokens) / prefill, "gen_tok_s": args.gen_tokens / gen,
                      "amx_build": "AMX_INT8 = 1" in info, "repack": "REPACK = 1" in info}))
    return 0


def run_child(args: argparse.Namespace, mode: str) -> dict:
    env = dict(os.environ)
    paths = [p for p in (args.pythonpath, str(ROOT)) if p]
    env["PYTHONPATH"] = os.pathsep.join(paths + [env.get("PYTHONPATH", "")])
    cmd = [sys.executable, __file__, "--child", mode, "--model", str(args.model), "--threads", str(args.threads),
           "--prompt-tokens", str(args.prompt_tokens), "--gen-tokens", str(args.gen_tokens)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    if proc.returncode < 0:
        import signal

        return {"crash": signal.Signals(-proc.returncode).name}
    if proc.returncode != 0:
        return {"crash": f"exit {proc.returncode}: {(proc.stderr.strip().splitlines() or [''])[-1][:120]}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def quantize(src: Path, kind: str) -> Path:
    import llama_cpp

    ftype = {"q4_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0, "q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0}[kind]
    out = Path(tempfile.mkdtemp(prefix="steer-bufts-")) / f"{src.stem}.{kind}.gguf"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.allow_requantize = True
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(out).encode(), params)
    if rc != 0:
        raise SystemExit(f"llama.cpp could not quantize {src} to {kind} (code {rc})")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--prompt-tokens", type=int, default=256)
    ap.add_argument("--gen-tokens", type=int, default=64)
    ap.add_argument("--pythonpath", default=None, help="put another llama-cpp-python build first on the children's path")
    ap.add_argument("--quantize", choices=["q4_0", "q8_0"], default=None)
    ap.add_argument("--child", choices=["on", "off"], default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.model is None:
        sys.path.insert(0, str(ROOT))
        from steer_tui.core.models import default_model_path

        args.model = default_model_path()
    if args.child:
        return child(args)
    if args.quantize:
        args.model = quantize(args.model, args.quantize)
    runs: dict[str, list[dict]] = {"off": [], "on": []}
    crashed: dict[str, str] = {}
    for _ in range(args.reps):
        for mode in ("off", "on"):
            if mode in crashed:
                continue
            r = run_child(args, mode)
            if "crash" in r:
                crashed[mode] = r["crash"]
            else:
                runs[mode].append(r)
    build = next((r for rs in runs.values() for r in rs), {})
    print(f"model {args.model.name}, {args.threads} threads, prompt {args.prompt_tokens} tokens, "
          f"{args.gen_tokens} generated, {args.reps} reps (medians); build: AMX {'yes' if build.get('amx_build') else 'no'}, "
          f"repack {'yes' if build.get('repack') else 'no'}{', from ' + args.pythonpath if args.pythonpath else ''}")
    print(f"{'extra buffer types':20} {'load s':>8} {'prefill tok/s':>14} {'gen tok/s':>10}")
    med: dict[str, dict[str, float]] = {}
    for mode in ("on", "off"):
        if mode in crashed:
            print(f"{mode:20} crashed ({crashed[mode]})")
            continue
        med[mode] = {k: statistics.median(r[k] for r in runs[mode]) for k in ("load_s", "prefill_tok_s", "gen_tok_s")}
        m = med[mode]
        print(f"{mode:20} {m['load_s']:8.2f} {m['prefill_tok_s']:14.1f} {m['gen_tok_s']:10.1f}")
    if len(med) == 2:
        print(f"{'off / on':20} {'':8} {med['off']['prefill_tok_s'] / med['on']['prefill_tok_s']:14.2f} "
              f"{med['off']['gen_tok_s'] / med['on']['gen_tok_s']:10.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
