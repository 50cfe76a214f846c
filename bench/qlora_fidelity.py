"""QLoRA fidelity: does an adapter trained on the NF4 base do in llama.cpp what it did in training?

Trains a LoRA adapter with ``--load-in-4bit`` (bitsandbytes NF4, on this CPU) on the bundled
SmolLM2-135M, exports ``adapter.gguf`` as ``steer-train`` does, and compares the adapter's
*effect*, ``delta = log p(next token | adapter on) - log p(... | adapter off)`` at every
position of the check text (`train.check.check_text`), four ways:

* ``cpp``: llama.cpp on an f32 copy of the GGUF (the exact weights the training model
  dequantizes from the GGUF, so only NF4 separates it from torch), with and without adapter.gguf;
* ``nf4``: torch on the NF4 base the adapter was trained on (PEFT adapter on / off);
* ``fp32``: torch on the full-precision base (the converted GGUF) with the same adapter;
* ``q``: llama.cpp on the GGUF as the user steers it (Q4_1 for the bundled model).

It prints the size of the effect (mean |delta|) and, for each pair, mean and max
|delta_a - delta_b| in nats and the correlation of the deltas; also how far NF4 moves the
base model itself (mean |log p_nf4 - log p_fp32|, adapter off).

    python bench/qlora_fidelity.py                 # SmolLM2-135M, 12 steps (minutes on a CPU)
    python bench/qlora_fidelity.py --dry-run       # a tiny random llama GGUF, 3 steps (seconds)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def tiny_gguf(path: Path, tokenizer_from: Path, hidden: int = 64, layers: int = 2, seed: int = 0) -> Path:
    """A random f32 llama GGUF with ``tokenizer_from``'s tokenizer (llama.cpp needs one to load)."""
    import gguf

    src = gguf.GGUFReader(str(tokenizer_from))
    vocab = len(src.fields["tokenizer.ggml.tokens"].data)
    w = gguf.GGUFWriter(str(path), "llama")
    for name, field in src.fields.items():
        if name.startswith("tokenizer."):
            vtype = field.types[0]
            sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
            w.add_key_value(name, field.contents(), vtype, sub_type=sub)
    heads, ff = 4, 2 * hidden
    w.add_name("qlora-fidelity-tiny")
    w.add_context_length(512)
    w.add_embedding_length(hidden)
    w.add_block_count(layers)
    w.add_vocab_size(vocab)
    w.add_feed_forward_length(ff)
    w.add_head_count(heads)
    w.add_head_count_kv(heads // 2)
    w.add_rope_dimension_count(hidden // heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    rng = np.random.default_rng(seed)

    def add(name: str, *shape: int, norm: bool = False) -> None:
        x = 1.0 + 0.1 * rng.standard_normal(shape) if norm else 0.25 * rng.standard_normal(shape)
        w.add_tensor(name, x.astype(np.float32))

    kv = hidden // heads * (heads // 2)
    add("token_embd.weight", vocab, hidden)
    add("output_norm.weight", hidden, norm=True)
    for i in range(layers):
        add(f"blk.{i}.attn_norm.weight", hidden, norm=True)
        add(f"blk.{i}.ffn_norm.weight", hidden, norm=True)
        add(f"blk.{i}.attn_q.weight", hidden, hidden)
        add(f"blk.{i}.attn_k.weight", kv, hidden)
        add(f"blk.{i}.attn_v.weight", kv, hidden)
        add(f"blk.{i}.attn_output.weight", hidden, hidden)
        add(f"blk.{i}.ffn_gate.weight", ff, hidden)
        add(f"blk.{i}.ffn_up.weight", ff, hidden)
        add(f"blk.{i}.ffn_down.weight", hidden, ff)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def train_nf4_adapter(where: Path, tokenizer, out: Path, *, steps: int, lr: float, arch: str):
    """LoRA trained on the NF4 base (the steer-train trainer's loss, plain AdamW loop); saved as
    the PEFT adapter + adapter.gguf in ``out``. Returns the PEFT model (NF4 base)."""
    import torch

    from bench.train_step import make_tasks
    from train.config import make_config
    from train.export import export_lora_gguf
    from train.model_setup import build_peft_model
    from train.quant import compute_dtype, load_4bit
    from train.trainer import SteerTrainer, TaskDataset, training_arguments

    torch.manual_seed(0)
    cfg = make_config(data=["x"], out=str(out), objective="sft+dpo", lr=lr, load_in_4bit=True, progress=False,
                      lora_dropout=0.0)
    model, _ = load_4bit(where, dtype=compute_dtype(cfg))
    model = build_peft_model(model, cfg)
    tasks = make_tasks(tokenizer, 2, 4)
    trainer = SteerTrainer(model=model, args=training_arguments(cfg, out), train_dataset=TaskDataset(tasks),
                           steer_config=cfg)
    trainer.prepare_reference(tasks)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        loss = trainer.compute_loss(model, {"tasks": tasks})
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(round(float(loss.detach()), 4))
    model.eval()
    model.save_pretrained(out, safe_serialization=True)
    export_lora_gguf(model, out / "adapter.gguf", arch=arch)
    return model, losses


def compare(a: np.ndarray, b: np.ndarray) -> dict:
    d = np.abs(a - b)
    corr = float(np.corrcoef(a, b)[0, 1]) if a.std() > 0 and b.std() > 0 else float("nan")
    return {"mean_abs": float(d.mean()), "max_abs": float(d.max()), "corr": corr}


def measure(gguf_f32: Path, gguf_user: Path | None, *, steps: int, lr: float, tokens: int | None, work: Path) -> dict:
    import torch
    from peft import PeftModel

    from train import gguf_model as G
    from train.check import check_text, hf_logprobs, llama_logprobs, next_token_lp
    from train.modeling import load_model, resolve_model

    source = resolve_model(str(gguf_f32))
    full, tok, where = load_model(source)  # converts once; fp32
    arch = G.read_meta(gguf_f32).arch
    out = work / "adapter"
    nf4, losses = train_nf4_adapter(Path(where), tok, out, steps=steps, lr=lr, arch=arch)
    text = check_text(gguf_f32, tokens)
    lp = {}
    with torch.no_grad():
        lp["nf4_on"] = next_token_lp(hf_logprobs(nf4, text), text)
        with nf4.disable_adapter():
            lp["nf4_off"] = next_token_lp(hf_logprobs(nf4, text), text)
        lp["fp32_off"] = next_token_lp(hf_logprobs(full, text), text)
        fp = PeftModel.from_pretrained(full, str(out)).eval()
        lp["fp32_on"] = next_token_lp(hf_logprobs(fp, text), text)
    lp["cpp_off"] = next_token_lp(llama_logprobs(gguf_f32, text), text)
    lp["cpp_on"] = next_token_lp(llama_logprobs(gguf_f32, text, adapter=str(out / "adapter.gguf")), text)
    kinds = ["cpp", "nf4", "fp32"]
    if gguf_user is not None:
        lp["q_off"] = next_token_lp(llama_logprobs(gguf_user, text), text)
        lp["q_on"] = next_token_lp(llama_logprobs(gguf_user, text, adapter=str(out / "adapter.gguf")), text)
        kinds.append("q")
    delta = {k: lp[f"{k}_on"] - lp[f"{k}_off"] for k in kinds}
    pairs = [("cpp", "nf4"), ("cpp", "fp32"), ("nf4", "fp32")] + ([("q", "nf4"), ("q", "cpp")] if gguf_user else [])
    return {
        "model": str(gguf_user or gguf_f32), "tokens": len(text), "steps": steps, "lr": lr, "losses": losses,
        "effect_mean_abs": {k: float(np.abs(v).mean()) for k, v in delta.items()},
        "effect_max_abs": {k: float(np.abs(v).max()) for k, v in delta.items()},
        "delta_vs": {f"{a} vs {b}": compare(delta[a], delta[b]) for a, b in pairs},
        "base_nf4_vs_fp32_mean_abs": float(np.abs(lp["nf4_off"] - lp["fp32_off"]).mean()),
        "base_cpp_vs_fp32_mean_abs": float(np.abs(lp["cpp_off"] - lp["fp32_off"]).mean()),
    }


def report(r: dict) -> str:
    lines = [f"{r['model']}: adapter trained {r['steps']} steps on the NF4 base (lr {r['lr']}, losses {r['losses']}), "
             f"{r['tokens']} tokens of the check text",
             "effect |delta| mean / max (nats): " + ", ".join(
                 f"{k} {r['effect_mean_abs'][k]:.4f} / {r['effect_max_abs'][k]:.4f}" for k in r["effect_mean_abs"]),
             "| deltas compared | mean abs diff (nats) | max abs diff | corr |", "|---|---:|---:|---:|"]
    for k, v in r["delta_vs"].items():
        lines.append(f"| {k} | {v['mean_abs']:.2e} | {v['max_abs']:.2e} | {v['corr']:.4f} |")
    lines.append(f"base model moved by NF4 (mean |log p nf4 - fp32|, adapter off): {r['base_nf4_vs_fp32_mean_abs']:.4f} "
                 f"nats; llama.cpp f32 vs torch fp32: {r['base_cpp_vs_fp32_mean_abs']:.2e}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gguf", help="the GGUF users steer (default: the bundled SmolLM2-135M)")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--tokens", type=int, help="check-text tokens (default: the text once, ~200)")
    ap.add_argument("--dry-run", action="store_true", help="a tiny random f32 llama GGUF, 3 steps (CI smoke test)")
    ap.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    args = ap.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    from steer_tui.core.models import default_model_path
    from tests.train.gguf_f32 import dequantize_gguf
    from train.quant import bnb_problem

    why = bnb_problem()
    if why:
        print(f"qlora_fidelity: cannot run NF4 here: {why}", file=sys.stderr)
        return 2
    user = Path(args.gguf) if args.gguf else Path(default_model_path())
    with tempfile.TemporaryDirectory(prefix="qlora-fidelity-") as tmp:
        work = Path(tmp)
        os.environ["STEER_CACHE"] = str(work / "cache")  # the conversions stay out of the user's cache
        if args.dry_run:
            f32, user, steps = tiny_gguf(work / "tiny-f32.gguf", user), None, 3
        else:
            f32, steps = dequantize_gguf(user, work / "f32.gguf"), args.steps
        r = measure(f32, user, steps=steps, lr=args.lr, tokens=args.tokens, work=work)
    print(report(r))
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
