"""Held-out evaluation on steers (split by task, never by steer).

For every steer of the given tasks:

* **steer accuracy**: the model prefers chosen over rejected, *length-matched*: the summed
  log-probs of the first ``m = min(len(chosen), len(rejected))`` tokens of each side are
  compared (a longer correction is not penalized for its length);
* **reward margin**: ``beta * ((pi_c - ref_c) - (pi_r - ref_r))`` over the full spans
  (0 for the reference itself);
* **first-token accuracy**: the model's top token at the branch point (after the shared
  prefix) is the correction's first token.

``before`` is the base model (adapter disabled), ``after`` the model with its adapter.
"""

from __future__ import annotations

from typing import Sequence

import torch

from train.data import Pair, TaskExample
from train.logprobs import token_logprobs
from train.reference import eval_mode


@torch.no_grad()
def pair_scores(model, pairs: Sequence[Pair], *, packing: str = "tree", token_budget: int = 4096,
                chunk: int = 16, adapter: bool = True) -> dict[str, torch.Tensor]:
    """Per-steer tensors: ``chosen``/``rejected`` (full-span sums), ``chosen_m``/``rejected_m``
    (length-matched sums) and ``first_ok`` (top-1 at the branch point == chosen[0]), in eval
    mode; ``adapter=False`` scores the reference (the adapter disabled, `train.reference.eval_mode`)."""
    res: dict[str, list] = {k: [] for k in ("chosen", "rejected", "chosen_m", "rejected_m", "first_ok")}
    with eval_mode(model, adapter=adapter):
        for i in range(0, len(pairs), chunk):
            part = pairs[i : i + chunk]
            seqs = []
            for p in part:
                seqs += [p.chosen_ids, p.rejected_ids]
            lps = token_logprobs(model, seqs, packing=packing, token_budget=token_budget, fallback=True)
            for j, p in enumerate(part):
                c, r = lps[2 * j].float().cpu(), lps[2 * j + 1].float().cpu()
                a = len(p.prefix) - 1
                m = min(len(p.chosen), len(p.rejected))
                res["chosen"].append(c[a : a + len(p.chosen)].sum())
                res["rejected"].append(r[a : a + len(p.rejected)].sum())
                res["chosen_m"].append(c[a : a + m].sum())
                res["rejected_m"].append(r[a : a + m].sum())
            res["first_ok"] += _first_token_hits(model, part)
    return {k: torch.stack(v) if k != "first_ok" else torch.tensor(v, dtype=torch.bool) for k, v in res.items()}


def _first_token_hits(model, pairs: Sequence[Pair]) -> list[bool]:
    dev = next(model.parameters()).device
    hits = []
    for p in pairs:
        ids = torch.tensor([p.prefix], device=dev)
        logits = model(input_ids=ids, use_cache=False, logits_to_keep=1).logits[0, -1]
        hits.append(int(logits.argmax()) == p.chosen[0])
    return hits


def summarize(policy: dict[str, torch.Tensor], reference: dict[str, torch.Tensor], beta: float) -> dict[str, float]:
    n = len(policy["chosen"])
    if n == 0:
        return {"steers": 0}
    margin = beta * ((policy["chosen"] - reference["chosen"]) - (policy["rejected"] - reference["rejected"]))
    return {
        "steers": n,
        "steer_accuracy": float((policy["chosen_m"] > policy["rejected_m"]).float().mean()),
        "reward_margin": float(margin.mean()),
        "first_token_accuracy": float(policy["first_ok"].float().mean()),
        "chosen_logp": float(policy["chosen"].mean()),
        "rejected_logp": float(policy["rejected"].mean()),
    }


def evaluate_tasks(model, tasks: Sequence[TaskExample], *, beta: float = 0.1, packing: str = "tree",
                   token_budget: int = 4096) -> dict[str, dict]:
    """``{"before": ..., "after": ...}`` on all steers of ``tasks``: both are scored here, each
    call, ``before`` with the adapter disabled, ``after`` with it; a model without an adapter
    gives ``after == before``."""
    pairs = [p for t in tasks for p in t.pairs]
    if not pairs:
        return {"before": {"steers": 0}, "after": {"steers": 0}}
    reference_scores = pair_scores(model, pairs, packing=packing, token_budget=token_budget, adapter=False)
    after = pair_scores(model, pairs, packing=packing, token_budget=token_budget)
    return {
        "before": summarize(reference_scores, reference_scores, beta),
        "after": summarize(after, reference_scores, beta),
    }
