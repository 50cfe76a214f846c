"""Bytes saved for backward on the logits / full-KL path of one packed row, before vs after
the chunked output layer (train/chunked.py).

One packed row of T tokens through a 1-layer Llama (hidden 64) with a V-token vocabulary;
the loss is what the trainer builds for an SFT path: the sum of the token log-probs plus the
full-vocabulary reference KL at every prediction (policy rows with grad, reference rows from
a no-grad pass, as `SteerTrainer.compute_loss` does). Saved tensors are counted with
``torch.autograd.graph.saved_tensors_hooks``, once per storage, leaving out the model's
parameters (they exist anyway). "head path" = the whole loss minus the decoder trunk alone
(the same forward through ``model.model``), i.e. what the output layer, the log-softmax and
the KL add.

    python bench/logits_memory.py                 # T = 2048 and 4096, V = 128k
    python bench/logits_memory.py --tokens 512 --vocab 32000

"before" (fused=False, the plain path) at large T would need ~3 x T x V x 4 bytes of real
memory (6 GiB at T = 4096, V = 128k, plus as much again in transients), so by default it runs
on the ``meta`` device, where autograd builds the same graph and the hooks see the same
shapes and dtypes without allocating; the script first checks, at ``--check-tokens``, that
meta and a real CPU run count the same bytes. "after" always runs for real on the CPU.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from train.losses import full_reference_kl  # noqa: E402
from train.memory import SavedBytes  # noqa: E402
from train.logprobs import token_logprobs  # noqa: E402


def tiny_model(vocab: int, hidden: int, device: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=16384,
                      tie_word_embeddings=True)
    cfg._attn_implementation = "eager"  # the same decomposition on meta and CPU (SDPA picks per device)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg)
    return model.train()


def loss_bytes(model, seq: list[int], fused: bool) -> tuple[int, int]:
    """(saved bytes of the whole loss, bytes the reference side keeps alive between passes)."""
    masks = [[True] * (len(seq) - 1)]
    with torch.no_grad():
        model.eval()
        _, ref = token_logprobs(model, [seq], dist_masks=masks, dist_states=fused, fused=fused, token_budget=len(seq))
        model.train()
    held = sum((r.hidden if hasattr(r, "hidden") else r).untyped_storage().nbytes() for r in ref)
    with SavedBytes(model) as sb:
        logps, dists = token_logprobs(model, [seq], dist_masks=masks, dist_states=fused, fused=fused,
                                      token_budget=len(seq))
        loss = -logps[0].sum() + full_reference_kl(dists, ref)
    del loss, logps, dists
    return sb.total, held


def trunk_bytes(model, seq: list[int]) -> int:
    """Saved bytes of the decoder alone (same packed row: one sequence, causal = ancestor mask)."""
    from train.logprobs import ancestor_mask

    dev = next(model.parameters()).device
    n = len(seq)
    ids = torch.tensor([seq], device=dev)
    end = torch.full((n,), n, device=dev)
    mask = ancestor_mask(end, next(model.parameters()).dtype)
    with SavedBytes(model) as sb:
        out = model.model(input_ids=ids, attention_mask=mask, position_ids=torch.arange(n, device=dev)[None],
                          use_cache=False)
    del out
    return sb.total


def measure(tokens: int, vocab: int, hidden: int, before_device: str) -> dict:
    seq = [(7 * i + 3) % vocab for i in range(tokens)]
    res = {"T": tokens, "V": vocab}
    for name, fused, device in (("before", False, before_device), ("after", True, "cpu")):
        model = tiny_model(vocab, hidden, device)
        total, held = loss_bytes(model, seq, fused)
        trunk = trunk_bytes(model, seq)
        res[name] = {"total": total, "trunk": trunk, "head": total - trunk, "ref_held": held, "device": device}
        del model
    return res


def step_seconds(model, seq: list[int], fused: bool) -> float:
    """Wall time of the reference pass + loss + backward (the trainer's step on one row)."""
    import time

    masks = [[True] * (len(seq) - 1)]
    t0 = time.perf_counter()
    with torch.no_grad():
        model.eval()
        _, ref = token_logprobs(model, [seq], dist_masks=masks, dist_states=fused, fused=fused, token_budget=len(seq))
        model.train()
    logps, dists = token_logprobs(model, [seq], dist_masks=masks, dist_states=fused, fused=fused, token_budget=len(seq))
    (-logps[0].sum() + full_reference_kl(dists, ref)).backward()
    return time.perf_counter() - t0


def timing(tokens: int, vocab: int, hidden: int, reps: int = 3, frozen_head: bool = False) -> tuple[float, float]:
    """Median seconds, plain vs chunked, interleaved on one model (real CPU). ``frozen_head``:
    the (tied) output layer gets no gradient, as under LoRA, so the chunked path takes its
    by-hand gradients instead of recomputing in backward."""
    model = tiny_model(vocab, hidden, "cpu")
    if frozen_head:
        model.get_output_embeddings().weight.requires_grad_(False)
    seq = [(7 * i + 3) % vocab for i in range(tokens)]
    runs = {False: [], True: []}
    for _ in range(reps):
        for fused in (False, True):
            model.zero_grad(set_to_none=True)
            runs[fused].append(step_seconds(model, seq, fused))
    med = {k: sorted(v)[len(v) // 2] for k, v in runs.items()}
    return med[False], med[True]


def gib(n: int) -> str:
    return f"{n / 2**30:8.3f} GiB" if n >= 2**27 else f"{n / 2**20:8.2f} MiB"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[2048, 4096])
    ap.add_argument("--vocab", type=int, default=128 * 1024)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--before-device", choices=["meta", "cpu"], default="meta")
    ap.add_argument("--check-tokens", type=int, default=256, help="T of the meta-vs-real check (0: skip)")
    ap.add_argument("--time", type=int, default=0, metavar="T",
                    help="also time the step (plain vs chunked, real CPU) on a row of T tokens")
    ap.add_argument("--frozen-head", action="store_true",
                    help="with --time: the output layer frozen, as under LoRA (the by-hand gradient path)")
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))

    if args.before_device == "meta" and args.check_tokens:
        seq = [(7 * i + 3) % args.vocab for i in range(args.check_tokens)]
        real = loss_bytes(tiny_model(args.vocab, args.hidden, "cpu"), seq, False)[0]
        meta = loss_bytes(tiny_model(args.vocab, args.hidden, "meta"), seq, False)[0]

        print(f"check at T={args.check_tokens}: before-path saved bytes, real CPU {real:,} vs meta {meta:,} "
              f"({'equal' if real == meta else 'DIFFER'})")
        if real != meta:
            return 1

    rows = [measure(t, args.vocab, args.hidden, args.before_device) for t in args.tokens]
    print(f"\nbytes saved for backward, one packed row, 1-layer Llama hidden {args.hidden}, V = {args.vocab:,}")
    print(f"{'T':>6} | {'head path before':>17} | {'head path after':>16} | {'ratio':>8} | "
          f"{'whole loss before':>17} | {'whole loss after':>16} | {'ratio':>7} | {'ref rows before':>15} | "
          f"{'ref after':>11}")
    for r in rows:
        b, a = r["before"], r["after"]
        print(f"{r['T']:>6} | {gib(b['head']):>17} | {gib(a['head']):>16} | {b['head'] / max(a['head'], 1):7.0f}x | "
              f"{gib(b['total']):>17} | {gib(a['total']):>16} | {b['total'] / max(a['total'], 1):6.1f}x | "
              f"{gib(b['ref_held']):>15} | {gib(a['ref_held']):>11}")
    if len(rows) > 1:
        r0, r1 = rows[0], rows[-1]
        k = r1["T"] / r0["T"]
        print(f"\nT x{k:g}: head path after x{r1['after']['head'] / r0['after']['head']:.3f}, "
              f"before x{r1['before']['head'] / r0['before']['head']:.3f} (linear in T: x{k:g})")
        print(f"per token, after: {r1['after']['head'] / r1['T']:.1f} bytes on the head path "
              f"(hidden {args.hidden}: {4 * args.hidden} bytes of fp32 hidden state per saved row); "
              f"before: {r1['before']['head'] / r1['T'] / (4 * args.vocab):.2f} x V x 4 bytes")
    if args.time:
        plain, chunked = timing(args.time, args.vocab, args.hidden, frozen_head=args.frozen_head)
        print(f"\nstep time at T={args.time}{', output layer frozen' if args.frozen_head else ''} "
              "(reference pass + loss + backward, median of 3, interleaved): "
              f"plain {plain:.2f} s, chunked {chunked:.2f} s, x{chunked / plain:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
