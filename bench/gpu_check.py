"""GPU check for steer-train: one table of what matters on a CUDA box.

1. A training step (LoRA, bf16, the trainer's loss shape: token log-probs + full-vocabulary
   KL against an adapter-disabled no-grad pass, chunked output layer) of a 2-layer Llama with
   a 128k and a 256k vocabulary at 4k and 8k tokens per micro-batch, tree-packed vs
   linearized (the same sequences, micro-batches of at most that many forwarded tokens):
   peak memory (``torch.cuda.max_memory_allocated``), loss tokens per second.
2. Which SDPA kernel actually runs with the tree's 4D additive mask (profiler op names:
   flash / efficient / cudnn / math).
3. FlexAttention (compiled, BlockMask) forward + backward vs SDPA with the same ancestor
   mask: time and largest difference of outputs and input gradients.

    python bench/gpu_check.py            # on a CUDA machine (a few minutes)
    python bench/gpu_check.py --dry-run  # tiny sizes on the CPU: checks the script runs (CI)

The data: one path of ``L`` tokens (an SFT path; the full KL covers every prediction) and
``K`` steers, each a prefix of the path plus 4 chosen / 4 rejected tokens; ``L`` is chosen so
the tree-packed row has the target token count. Linearized, the same sequences forward
``~K*L`` tokens (every steer re-forwards its prefix), split into micro-batches.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from train.losses import full_reference_kl  # noqa: E402
from train.logprobs import ancestor_block_mask, ancestor_mask, token_logprobs  # noqa: E402
from train.packing import plan_packing  # noqa: E402


def build_model(vocab: int, hidden: int, layers: int, heads: int, device, dtype, attn: str = "sdpa"):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 3, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=max(1, heads // 4),
                      max_position_embeddings=32768, tie_word_embeddings=False)
    cfg._attn_implementation = attn
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(device=device, dtype=dtype)
    lc = LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                                            "gate_proj", "up_proj", "down_proj"])
    return get_peft_model(model, lc)


def steer_data(tokens: int, steers: int, vocab: int, seed: int = 0):
    """(sequences, kl masks): one SFT path + `steers` chosen/rejected pairs, tree size ~tokens."""
    rng = random.Random(seed)
    length = max(16, tokens - 8 * steers)
    path = [rng.randrange(vocab) for _ in range(length)]
    seqs, masks = [path], [[True] * (length - 1)]
    for _ in range(steers):
        cut = rng.randrange(8, length)
        for _side in range(2):
            s = path[:cut] + [rng.randrange(vocab) for _ in range(4)]
            seqs.append(s)
            masks.append([False] * (len(s) - 1))
    return seqs, masks


def micro_batches(seqs, masks, packing: str, budget: int):
    out, cur = [], []
    for i in range(len(seqs)):
        cand = cur + [i]
        n = plan_packing([seqs[j] for j in cand], packing=packing, token_budget=budget).tokens_forwarded
        if cur and n > budget:
            out.append(cur)
            cand = [i]
        cur = cand
    if cur:
        out.append(cur)
    return out


def train_step(model, seqs, masks, packing: str, budget: int, device):
    """Loss = -mean log-prob + full KL, backward per micro-batch; returns (seconds, loss tokens, forwarded)."""
    n_tokens = sum(len(s) - 1 for s in seqs)
    forwarded = 0
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for mb in micro_batches(seqs, masks, packing, budget):
        ss, mm = [seqs[i] for i in mb], [masks[i] for i in mb]
        forwarded += plan_packing(ss, packing=packing, token_budget=budget).tokens_forwarded
        with torch.no_grad(), model.disable_adapter():
            _, ref = token_logprobs(model, ss, packing=packing, token_budget=budget, dist_masks=mm, dist_states=True)
        logps, dists = token_logprobs(model, ss, packing=packing, token_budget=budget, dist_masks=mm, dist_states=True)
        loss = -sum(lp.sum() for lp in logps) / n_tokens
        if any(len(d) for d in dists):
            loss = loss + full_reference_kl(dists, ref)
        loss.backward()
        del loss, logps, dists, ref
    sync()
    return time.perf_counter() - t0, n_tokens, forwarded


def measure_step(vocab, tokens, packing, a, device, dtype):
    model = build_model(vocab, a.hidden, a.layers, a.heads, device, dtype)
    model.train()
    seqs, masks = steer_data(tokens, a.steers, vocab)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    try:
        train_step(model, seqs, masks, packing, tokens, device)  # warm-up
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        sec, n, fwd = train_step(model, seqs, masks, packing, tokens, device)
        peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
        return {"s": sec, "loss_tokens": n, "forwarded": fwd, "peak": peak, "error": None}
    except torch.OutOfMemoryError as exc:
        return {"s": None, "loss_tokens": None, "forwarded": None, "peak": None, "error": f"OOM ({str(exc)[:60]})"}
    finally:
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()


def tree_row(tokens: int, steers: int, device):
    seqs, _ = steer_data(tokens, steers, 1000)
    row = plan_packing(seqs, token_budget=10**9).rows[0]
    return torch.from_numpy(row.end).to(device)


def sdpa_kernel_used(tokens, a, device, dtype) -> str:
    """The SDPA op the dispatcher picks with the tree's additive mask (profiler op names)."""
    from torch.profiler import ProfilerActivity, profile

    end = tree_row(tokens, a.steers, device)
    n = end.shape[0]
    d = a.hidden // a.heads
    q, k, v = (torch.randn(1, a.heads, n, d, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    mask = ancestor_mask(end, dtype)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        out.sum().backward()
    names = {e.key for e in prof.key_averages()}
    picked = sorted(x for x in names if "scaled_dot_product" in x and x != "aten::scaled_dot_product_attention")
    return ", ".join(p.replace("aten::_scaled_dot_product_", "") for p in picked) or "?"


def flex_vs_sdpa(tokens, a, device, dtype) -> dict:
    from torch.nn.attention.flex_attention import flex_attention

    end = tree_row(tokens, a.steers, device)
    n = end.shape[0]
    d = a.hidden // a.heads
    torch.manual_seed(0)
    base = [torch.randn(1, a.heads, n, d, device=device, dtype=dtype) for _ in range(3)]
    mask = ancestor_mask(end, dtype)
    block = ancestor_block_mask(end)
    flex = torch.compile(flex_attention) if device.type == "cuda" else flex_attention
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    backward = device.type == "cuda"  # FlexAttention has no CPU backward
    res = {}
    for name, fn in (("sdpa", lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)),
                     ("flex", lambda q, k, v: flex(q, k, v, block_mask=block))):
        times = []
        for rep in range(3 if device.type == "cuda" else 1):
            q, k, v = (t.clone().requires_grad_(backward) for t in base)
            sync()
            t0 = time.perf_counter()
            out = fn(q, k, v)
            if backward:
                out.float().pow(2).sum().backward()
            sync()
            times.append(time.perf_counter() - t0)
        res[name] = (min(times[1:] or times), out.detach().float(), [t.grad.float() for t in (q, k, v)] if backward else None)
    (ts, os_, gs), (tf, of, gf) = res["sdpa"], res["flex"]
    out = {"rows": n, "sdpa_ms": ts * 1e3, "flex_ms": tf * 1e3, "out_diff": float((os_ - of).abs().max()),
           "grad_diff": max(float((x - y).abs().max()) for x, y in zip(gs, gf)) if gs else None,
           "backward": backward}
    return out


def fmt_bytes(n):
    return "n/a (CPU)" if n is None else f"{n / 2**30:.2f} GiB"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU (the script runs; numbers mean nothing)")
    ap.add_argument("--vocabs", type=int, nargs="+", default=[128 * 1024, 256 * 1024])
    ap.add_argument("--tokens", type=int, nargs="+", default=[4096, 8192])
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--steers", type=int, default=64)
    a = ap.parse_args(argv)
    if a.dry_run:
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        a.vocabs, a.tokens, a.hidden, a.layers, a.heads, a.steers = [512, 1024], [64, 128], 32, 1, 4, 4
        device, dtype = torch.device("cpu"), torch.float32
    else:
        if not torch.cuda.is_available():
            print("no CUDA device; use --dry-run on a CPU", file=sys.stderr)
            return 2
        device = torch.device("cuda")
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    name = torch.cuda.get_device_name(0) if device.type == "cuda" else "CPU (dry run)"
    print(f"# steer-train GPU check: {name}, torch {torch.__version__}, {dtype}, Llama {a.layers} layers hidden "
          f"{a.hidden}, {a.steers} steers per step")
    rows = []
    for vocab in a.vocabs:
        for tokens in a.tokens:
            for packing in ("tree", "none"):
                r = measure_step(vocab, tokens, packing, a, device, dtype)
                rows.append((vocab, tokens, packing, r))
    print("\n| vocab | tokens/micro-batch | packing | forwarded | peak memory | step s | loss tokens/s |")
    print("|---|---|---|---|---|---|---|")
    for vocab, tokens, packing, r in rows:
        if r["error"]:
            print(f"| {vocab:,} | {tokens:,} | {packing} | | {r['error']} | | |")
            continue
        print(f"| {vocab:,} | {tokens:,} | {packing} | {r['forwarded']:,} | {fmt_bytes(r['peak'])} | {r['s']:.3f} | "
              f"{r['loss_tokens'] / r['s']:,.0f} |")
    print("\n| check | tokens | result |")
    print("|---|---|---|")
    for tokens in a.tokens:
        print(f"| SDPA kernel with the ancestor mask | {tokens:,} | {sdpa_kernel_used(tokens, a, device, dtype)} |")
    for tokens in a.tokens:
        try:
            f = flex_vs_sdpa(tokens, a, device, dtype)
            bw = "fwd+bwd" if f["backward"] else "fwd only (no FlexAttention backward on CPU)"
            gd = f", max |grad diff| {f['grad_diff']:.2e}" if f["grad_diff"] is not None else ""
            print(f"| FlexAttention vs SDPA, {bw} | {f['rows']:,} | flex {f['flex_ms']:.2f} ms, sdpa {f['sdpa_ms']:.2f} ms,"
                  f" max |out diff| {f['out_diff']:.2e}{gd} |")
        except Exception as exc:  # report, do not hide
            print(f"| FlexAttention vs SDPA | {tokens:,} | failed: {type(exc).__name__}: {str(exc)[:120]} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
