"""Tree packing vs linearized sequences: tokens forwarded and wall time per training epoch.

One run, side by side, same model and settings: LoRA (q_proj, v_proj) on the bundled
SmolLM2-135M-Instruct loaded from its GGUF in fp32 on the CPU (or --device). An epoch is
forward + backward over every training sequence of one steer tree with the trainer's loss
terms from `train.losses` (masked SFT NLL on human tokens + localized DPO against reference
log-probs computed once, adapter disabled). Both epochs must give the same loss and the
same LoRA gradients.

The tree is synthesized as the trainer would see it (until real captured trees are passed
with --tree): a prompt of --prompt tokens and a response of --gen tokens; --steers cut
points spread over the response, each with a human correction of 10-20 tokens on the final
path (chosen) and the model's replaced continuation as a dead branch of the same length
(rejected, K = chosen length); the final path plus two alternative accepted endings are
the SFT sequences. Token ids are random (the cost of a forward pass does not depend on
them). --tree FILE.json uses a real steer-tree file through `train.data.build_task`.

Micro-batches: a training step cannot hold the graph of a whole linearized epoch, so
units (an SFT sequence, or a steer's chosen+rejected pair) are grouped greedily into
micro-batches of at most --token-budget forwarded tokens for each layout, each followed
by its backward (gradient accumulation); the loss terms are sums divided by fixed counts,
so the totals are comparable exactly.

Timing: the linearized epoch is long, so --tree-samples tree epochs are run spread over it
(before, between its micro-batches, after) and the median is reported: on a shared
machine both layouts then see the same load. Wall and process CPU seconds are both shown
(with --threads 1 the CPU time is the compute, whatever else runs on the machine).

    python bench/packing.py            # >= 50 steers over 1,000 generated tokens
    python bench/packing.py --quick    # a small tree, ~1 minute
"""

from __future__ import annotations

import argparse
import os
import random
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from train.losses import dpo_loss, span_logps  # noqa: E402
from train.logprobs import token_logprobs  # noqa: E402
from train.packing import pack_stats, plan_packing  # noqa: E402


@dataclass
class Unit:
    """One loss term's sequences: an SFT path (weights per prediction) or a steer pair."""

    kind: str  # "sft" | "pair"
    seqs: list[list[int]]
    weights: list[float] | None = None  # sft: per target token (len(seq) - 1)
    spans: list[tuple[int, int]] | None = None  # pair: chosen span, rejected span


def synth_tree(prompt: int, gen: int, steers: int, seed: int, vocab: int) -> list[Unit]:
    rng = random.Random(seed)

    def toks(n: int) -> list[int]:
        return [rng.randrange(100, vocab) for _ in range(n)]

    lens = [rng.randint(10, 20) for _ in range(steers)]
    if sum(lens) + steers > gen:
        raise SystemExit(f"--gen {gen} is too short for {steers} steers of 10-20 tokens")
    # cut points spread over the response: disjoint human spans at random offsets
    free = gen - sum(lens)
    gaps = sorted(rng.sample(range(free + 1), steers))
    cuts, pos, prev_gap = [], 0, 0
    for g, n in zip(gaps, lens):
        pos += g - prev_gap
        cuts.append(pos)
        pos += n
        prev_gap = g
    path = toks(prompt + gen)
    human = [0.0] * len(path)
    units: list[Unit] = []
    for c, n in zip(cuts, lens):
        a = prompt + c
        for k in range(a, a + n):
            human[k] = 1.0
        prefix = path[:a]
        chosen, rejected = path[a : a + n], toks(n)
        p = len(prefix) - 1
        units.append(Unit("pair", [prefix + chosen, prefix + rejected], spans=[(p, p + n), (p, p + n)]))
    # the final path and two alternative accepted endings (a human append of 10 tokens each)
    sft = [(path, human)]
    for _ in range(2):
        at = rng.randrange(prompt + gen // 2, prompt + gen)
        tail = toks(10)
        sft.append((path[:at] + tail, human[:at] + [1.0] * 10))
    for seq, w in sft:
        units.append(Unit("sft", [seq], weights=w[1:]))
    return units


def tree_units(path: str, vocab: int) -> list[Unit]:
    from steer_tui.core.store import load_tree
    from train.data import DataOptions, build_task

    ex = build_task(load_tree(path), DataOptions())
    units = [Unit("sft", [s.input_ids], weights=list(s.weights[1:])) for s in ex.sft if len(s.input_ids) > 1]
    for p in ex.pairs:
        units.append(Unit("pair", [p.chosen_ids, p.rejected_ids], spans=[p.chosen_span, p.rejected_span]))
    if not units:
        raise SystemExit(f"{path}: no SFT sequence and no steer to train on")
    return units


def micro_batches(units: list[Unit], packing: str, budget: int) -> list[list[Unit]]:
    """Greedy: add units while the layout forwards at most `budget` tokens."""
    out: list[list[Unit]] = []
    cur: list[Unit] = []
    for u in units:
        trial = cur + [u]
        seqs = [s for x in trial for s in x.seqs]
        if cur and plan_packing(seqs, packing=packing, token_budget=10**9).tokens_forwarded > budget:
            out.append(cur)
            trial = [u]
        cur = trial
    if cur:
        out.append(cur)
    return out


@dataclass
class Tally:
    """Sums over the micro-batches of one epoch of one layout."""

    loss: float = 0.0
    wall: float = 0.0
    cpu: float = 0.0
    tokens: int = 0
    rows: int = 0
    grads: dict | None = None

    def add_grads(self, model) -> None:
        """Move the LoRA gradients of the last backward into this tally."""
        if self.grads is None:
            self.grads = {}
        for n, p in model.named_parameters():
            if p.grad is not None:
                g = self.grads.get(n)
                self.grads[n] = p.grad.detach().clone() if g is None else g + p.grad
                p.grad = None


def micro_step(model, mb, refs, n_sft, n_pair, packing, budget, beta, tally: Tally) -> None:
    """Forward + backward of one micro-batch, timed (wall and process CPU) into `tally`."""
    seqs = [s for u in mb for s in u.seqs]
    w0, c0 = time.perf_counter(), time.process_time()
    plan = plan_packing(seqs, packing=packing, token_budget=budget)
    lps = token_logprobs(model, seqs, packing=packing, token_budget=budget, plan=plan)
    loss = lps[0].new_zeros(())
    i = 0
    for u in mb:
        if u.kind == "sft":
            w = torch.tensor(u.weights, dtype=lps[i].dtype)
            loss = loss + (-(lps[i] * w).sum() / w.sum()) / n_sft
        else:
            (pc, pr), _ = span_logps(lps[i : i + 2], u.spans)
            rc, rr = refs[id(u)]
            loss = loss + dpo_loss(pc[None], pr[None], rc[None], rr[None], beta=beta).losses.sum() / n_pair
        i += len(u.seqs)
    loss.backward()
    tally.wall += time.perf_counter() - w0
    tally.cpu += time.process_time() - c0
    tally.loss += float(loss.detach())
    tally.tokens += plan.tokens_forwarded
    tally.rows += len(plan.rows) if packing == "tree" else len(plan.linear_rows)
    tally.add_grads(model)


def lora_grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a small tree (12 steers over 300 tokens)")
    ap.add_argument("--tree", help="a steer-tree JSON file to use instead of the synthetic tree")
    ap.add_argument("--steers", type=int, default=50)
    ap.add_argument("--gen", type=int, default=1000, help="generated (response) tokens")
    ap.add_argument("--prompt", type=int, default=30, help="prompt tokens")
    ap.add_argument("--token-budget", type=int, default=3072, help="tokens per micro-batch / packed row")
    ap.add_argument("--tree-samples", type=int, default=3,
                    help="tree epochs timed, spread over the linearized epoch; the median is reported")
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    args = ap.parse_args(argv)
    if args.quick:
        args.steers, args.gen = 12, 300
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from steer_tui.core.models import default_model_path

    hf_logging.set_verbosity_error()
    gguf = default_model_path()
    t = time.perf_counter()
    base = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    base.set_attn_implementation("sdpa")
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                            init_lora_weights=False)).to(args.device)
    model.train()
    load_s = time.perf_counter() - t
    vocab = base.config.vocab_size

    units = tree_units(args.tree, vocab) if args.tree else synth_tree(args.prompt, args.gen, args.steers, args.seed, vocab)
    all_seqs = [s for u in units for s in u.seqs]
    n_sft = sum(u.kind == "sft" for u in units) or 1
    n_pair = sum(u.kind == "pair" for u in units) or 1
    stats = pack_stats(all_seqs, args.token_budget)
    print(f"model: {gguf.name} fp32 sdpa, LoRA r=8 q_proj/v_proj, device {args.device}, "
          f"torch threads {torch.get_num_threads()}, loaded in {load_s:.1f}s")
    src = args.tree or f"synthetic: prompt {args.prompt} + {args.gen} generated tokens, {args.steers} steers"
    print(f"tree: {src}; {n_sft} SFT sequences, {sum(u.kind == 'pair' for u in units)} steers "
          f"({stats['sequences']} sequences, {stats['loss_tokens']} predicted positions)")

    # Reference log-probs once (adapter disabled), shared by both layouts; not part of the epoch.
    t = time.perf_counter()
    refs = {}
    with torch.no_grad(), model.disable_adapter():
        pairs = [u for u in units if u.kind == "pair"]
        out = token_logprobs(model, [s for u in pairs for s in u.seqs], token_budget=args.token_budget)
        for j, u in enumerate(pairs):
            (rc, rr), _ = span_logps(out[2 * j : 2 * j + 2], u.spans)
            refs[id(u)] = (rc, rr)
    ref_s = time.perf_counter() - t
    print(f"reference pass (tree-packed, no grad, once): {ref_s:.1f}s")

    batches = {p: micro_batches(units, p, args.token_budget) for p in ("tree", "none")}
    step = lambda mb, packing, tally: micro_step(  # noqa: E731
        model, mb, refs, n_sft, n_pair, packing, args.token_budget, args.beta, tally)
    # Warm-up (allocator, kernels): one small micro-batch per layout, untimed.
    warm = [next(u for u in units if u.kind == "pair")]
    for packing in ("tree", "none"):
        step(warm, packing, Tally())
    model.zero_grad(set_to_none=True)

    # The linearized epoch is long; tree epochs run at --tree-samples points spread over it
    # (before, between its micro-batches, after) so both layouts see the same machine load.
    load0 = os.getloadavg()[0]
    lin_batches = batches["none"]
    k = max(1, args.tree_samples)
    at = sorted({round(j * len(lin_batches) / max(1, k - 1)) for j in range(k)}) if k > 1 else [0]
    lin = Tally()
    trees: list[Tally] = []
    for i in range(len(lin_batches) + 1):
        while at and at[0] == i:
            at.pop(0)
            tally = Tally()
            for mb in batches["tree"]:
                step(mb, "tree", tally)
            trees.append(tally)
            print(f"  tree epoch: loss {tally.loss:.6f}  {tally.wall:.1f}s wall  {tally.cpu:.1f}s cpu", flush=True)
        if i < len(lin_batches):
            step(lin_batches[i], "none", lin)
            if (i + 1) % 5 == 0 or i + 1 == len(lin_batches):
                print(f"  linearized micro-batch {i + 1}/{len(lin_batches)}: {lin.wall:.1f}s wall, "
                      f"{lin.cpu:.1f}s cpu so far", flush=True)
    load1 = os.getloadavg()[0]

    tree = sorted(trees, key=lambda t: t.wall)[len(trees) // 2]  # median by wall time
    tree_cpu = sorted(t.cpu for t in trees)[len(trees) // 2]
    tree_s, lin_s = tree.wall, lin.wall
    tree_tok, lin_tok = tree.tokens, lin.tokens
    loss_t, loss_l = tree.loss, lin.loss
    gdiff = max((tree.grads[n] - lin.grads[n]).abs().max().item() for n in tree.grads)
    gscale = max(g.abs().max().item() for g in lin.grads.values())
    print()
    print(f"{'':24}{'tree':>14}{'linearized':>14}{'ratio':>10}")
    print(f"{'tokens forwarded':24}{tree_tok:>14,}{lin_tok:>14,}{lin_tok / tree_tok:>9.1f}x")
    print(f"{'forward rows':24}{tree.rows:>14}{lin.rows:>14}")
    print(f"{'wall s / epoch (f+b)':24}{tree_s:>14.1f}{lin_s:>14.1f}{lin_s / tree_s:>9.1f}x")
    print(f"{'cpu s / epoch (f+b)':24}{tree_cpu:>14.1f}{lin.cpu:>14.1f}{lin.cpu / tree_cpu:>9.1f}x")
    print(f"{'tokens / wall s':24}{tree_tok / tree_s:>14.0f}{lin_tok / lin_s:>14.0f}")
    print(f"{'loss':24}{loss_t:>14.6f}{loss_l:>14.6f}{'':>4}|diff| {abs(loss_t - loss_l):.1e}")
    print(f"tree epochs timed: {len(trees)} (median shown; wall {', '.join(f'{t.wall:.1f}' for t in trees)}); "
          f"load average {load0:.1f} at start, {load1:.1f} at end")
    print(f"LoRA grads: max |tree - linear| {gdiff:.2e} (max |grad| {gscale:.2e})")
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.1f} GiB")
    ok = abs(loss_t - loss_l) <= 1e-4 * max(1.0, abs(loss_l)) and gdiff <= 1e-4 * max(1.0, gscale)
    print("equal loss and gradients: " + ("yes" if ok else "NO"))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
