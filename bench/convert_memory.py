"""Peak host RAM of turning a GGUF into a trainable model: transformers' GGUF loader vs ours.

Writes a random llama-architecture GGUF (Q8_0 matrices, f32 norms, untied output, no
tokenizer) big enough that its weights dwarf the torch/transformers baseline, then runs each
phase in a **fresh child process** (so peaks do not mix) and reads the child's peak resident
set (``getrusage(RUSAGE_SELF).ru_maxrss`` and ``/proc/self/status`` ``VmHWM``; the larger
is reported) minus its resident set after importing torch/transformers/gguf (the baseline):

* ``before``: ``AutoModelForCausalLM.from_pretrained(dir, gguf_file=..., dtype=bfloat16)``,
  transformers' own loader (what steer-train used before ``train.gguf_model``);
* ``convert``: ``train.modeling.convert_gguf`` with a cold cache (``STEER_CACHE`` in a temp dir);
* ``load``: ``train.modeling.load_model(..., dtype=bfloat16)`` from that cache (what a GPU box
  does next).

Each is shown against the bf16 model size (parameters x 2 bytes), with the GGUF's and the
converted cache's size on disk::

    python bench/convert_memory.py                  # ~370M parameters (hidden 1024, 24 layers)
    python bench/convert_memory.py --params-scale 2 # twice the layers
    python bench/convert_memory.py --dry-run        # tiny model, seconds (CI smoke test)

File-backed pages of memory-mapped files (the GGUF, safetensors shards) count in the peak
resident set (the kernel counts them for the process, though it can reclaim them); the
"anonymous" columns are the peak of ``RssAnon`` alone (heap, tensors), sampled every 5 ms
(over its own baseline), as the kernel keeps no high-water mark for it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PHASES = ("before", "convert", "load")
LABELS = {
    "before": "transformers from_pretrained(gguf_file=), bf16",
    "convert": "steer-train convert_gguf (cold cache)",
    "load": "steer-train load_model from the cache, bf16",
}


# ---------------------------------------------------------------------------- the GGUF


def model_shape(args) -> dict:
    if args.dry_run:
        return dict(hidden=64, layers=2, ff=128, heads=4, kv_heads=2, vocab=512)
    layers = max(1, round(args.layers * args.params_scale))
    ff = args.ff or (args.hidden * 11 // 4 + 255) // 256 * 256
    return dict(hidden=args.hidden, layers=layers, ff=ff, heads=args.heads, kv_heads=args.kv_heads, vocab=args.vocab)


def write_gguf(path: Path, s: dict, qtype: str = "Q8_0", seed: int = 0) -> int:
    """A random llama GGUF of shape ``s`` at ``path``; returns its parameter count."""
    import gguf
    import numpy as np

    rng = np.random.default_rng(seed)
    quant = gguf.GGMLQuantizationType[qtype]
    h, hd = s["hidden"], s["hidden"] // s["heads"]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("convert-memory-bench")
    w.add_context_length(4096)
    w.add_embedding_length(h)
    w.add_block_count(s["layers"])
    w.add_vocab_size(s["vocab"])  # transformers' loader reads it from the tokenizer otherwise
    w.add_feed_forward_length(s["ff"])
    w.add_head_count(s["heads"])
    w.add_head_count_kv(s["kv_heads"])
    w.add_rope_dimension_count(hd)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0 if qtype == "Q8_0" else gguf.LlamaFileType.MOSTLY_F16)
    n_params = 0

    def add(name: str, rows: int, cols: int | None = None) -> None:
        nonlocal n_params
        if cols is None:  # a norm: f32, as llama.cpp's converter writes them
            w.add_tensor(name, (1.0 + 0.1 * rng.standard_normal(rows)).astype(np.float32))
            n_params += rows
            return
        x = (0.02 * rng.standard_normal((rows, cols), dtype=np.float32))
        if quant == gguf.GGMLQuantizationType.F16:
            w.add_tensor(name, x.astype(np.float16))
        else:
            w.add_tensor(name, gguf.quants.quantize(x, quant), raw_dtype=quant)
        n_params += rows * cols

    add("token_embd.weight", s["vocab"], h)
    for i in range(s["layers"]):
        add(f"blk.{i}.attn_norm.weight", h)
        add(f"blk.{i}.attn_q.weight", h, h)
        add(f"blk.{i}.attn_k.weight", s["kv_heads"] * hd, h)
        add(f"blk.{i}.attn_v.weight", s["kv_heads"] * hd, h)
        add(f"blk.{i}.attn_output.weight", h, h)
        add(f"blk.{i}.ffn_norm.weight", h)
        add(f"blk.{i}.ffn_gate.weight", s["ff"], h)
        add(f"blk.{i}.ffn_up.weight", s["ff"], h)
        add(f"blk.{i}.ffn_down.weight", h, s["ff"])
    add("output_norm.weight", h)
    add("output.weight", s["vocab"], h)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return n_params


# ---------------------------------------------------------------------------- one phase (child)


def _status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def child(phase: str, gguf_path: str, sha256: str) -> dict:
    """Run ``phase`` in this (fresh) process; return its baseline and peak in KiB."""
    import resource

    import gguf.quants  # noqa: F401
    import safetensors.torch  # noqa: F401
    import torch
    import transformers.integrations.ggml  # noqa: F401
    import transformers.models.llama.modeling_llama  # noqa: F401
    from transformers import AutoModelForCausalLM

    from train import gguf_config, gguf_model, gguf_weights, modeling  # noqa: F401

    base, base_anon = _status_kb("VmRSS"), _status_kb("RssAnon")
    anon = [_status_kb("RssAnon")]
    done = threading.Event()

    def sample() -> None:  # anonymous memory has no kernel high-water mark: sample it
        while not done.wait(0.005):
            anon[0] = max(anon[0], _status_kb("RssAnon"))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    source = modeling.ModelSource("gguf", gguf_path, sha256)
    if phase == "before":
        p = Path(gguf_path)
        model = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=torch.bfloat16)
    elif phase == "convert":
        model = modeling.convert_gguf(source)
    elif phase == "load":
        if not modeling._fresh(modeling.converted_dir(source)):
            raise SystemExit("load: no converted cache (run the convert phase first)")
        model, _, _ = modeling.load_model(source, dtype=torch.bfloat16)
    else:
        raise SystemExit(f"unknown phase {phase!r}")
    seconds = time.perf_counter() - t0
    peak = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, _status_kb("VmHWM"))
    done.set()
    sampler.join()
    del model
    return {"phase": phase, "baseline_kb": base, "peak_kb": peak, "anon_kb": anon[0] - base_anon, "seconds": seconds}


def run_child(phase: str, gguf_path: Path, sha256: str, cache: Path) -> dict:
    env = dict(os.environ, STEER_CACHE=str(cache), PYTHONPATH=os.pathsep.join(
        [str(REPO)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])))
    r = subprocess.run([sys.executable, __file__, "--child", phase, "--gguf", str(gguf_path), "--sha256", sha256],
                       env=env, capture_output=True, text=True)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
    if r.returncode != 0 or not lines:
        raise SystemExit(f"phase {phase} failed (exit {r.returncode}):\n{r.stderr[-3000:]}")
    return json.loads(lines[-1])


# ---------------------------------------------------------------------------- the table


def dir_bytes(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def table(rows: list[dict], bf16: int, n_params: int, gguf_bytes: int, cache_bytes: int | None) -> str:
    mib = 1 << 20
    out = [f"model: {n_params / 1e6:.1f}M parameters, bf16 size {bf16 / mib:.1f} MiB, "
           f"GGUF {gguf_bytes / mib:.1f} MiB on disk"
           + (f", converted cache {cache_bytes / mib:.1f} MiB on disk" if cache_bytes is not None else ""),
           "",
           f"| {'phase':<48} | baseline MiB | peak RSS MiB (minus baseline) | peak / bf16 "
           f"| anonymous peak MiB | anon / bf16 | seconds |",
           f"|{'-' * 50}|-------------:|------------------------------:|------------:"
           f"|-------------------:|------------:|--------:|"]
    for r in rows:
        net, anon = (r["peak_kb"] - r["baseline_kb"]) * 1024, r["anon_kb"] * 1024
        out.append(f"| {LABELS[r['phase']]:<48} | {r['baseline_kb'] / 1024:12.1f} | {net / mib:29.1f} "
                   f"| {net / bf16:11.2f} | {anon / mib:18.1f} | {anon / bf16:11.2f} | {r['seconds']:7.1f} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--params-scale", type=float, default=1.0, help="multiply the layer count")
    ap.add_argument("--ff", type=int, default=0, help="feed-forward size (default: 2.75 x hidden, rounded to 256)")
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--type", default="Q8_0", choices=("Q8_0", "F16"), help="GGUF type of the matrices")
    ap.add_argument("--phases", default=",".join(PHASES), help="comma-separated subset of " + ",".join(PHASES))
    ap.add_argument("--dry-run", action="store_true", help="tiny model (seconds), for CI")
    ap.add_argument("--workdir", help="keep the GGUF and cache here (default: a temp dir, removed)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--gguf", help=argparse.SUPPRESS)
    ap.add_argument("--sha256", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.gguf, args.sha256)), flush=True)
        return 0
    phases = [p for p in args.phases.split(",") if p]
    if any(p not in PHASES for p in phases):
        ap.error(f"--phases: choose from {', '.join(PHASES)}")
    if "load" in phases and "convert" not in phases:
        ap.error("--phases: load reads the cache the convert phase writes")

    sys.path.insert(0, str(REPO))
    from steer_tui.core.store import file_sha256

    with tempfile.TemporaryDirectory(prefix="convert-memory-") as tmp:
        work = Path(args.workdir) if args.workdir else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        s = model_shape(args)
        gguf_path = work / "model.gguf"
        print(f"writing a random {args.type} llama GGUF: {s}", file=sys.stderr, flush=True)
        n_params = write_gguf(gguf_path, s, args.type)
        sha = file_sha256(gguf_path)
        cache = work / "cache"
        rows = []
        for phase in phases:
            print(f"phase {phase}...", file=sys.stderr, flush=True)
            rows.append(run_child(phase, gguf_path, sha, cache))
        conv = cache / "models" / sha
        cache_bytes = dir_bytes(conv) if conv.is_dir() else None
        print(table(rows, 2 * n_params, n_params, gguf_path.stat().st_size, cache_bytes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
