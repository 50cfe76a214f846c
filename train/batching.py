"""A batch of tasks as token sequences, and its split into micro-batches.

`Batch` turns the tasks of one step (:class:`train.data.TaskExample`) into the token
sequences one ``token_logprobs`` call forwards (SFT paths, prefix+chosen, prefix+rejected),
records where each loss term finds its part (``sft_idx``, ``chosen_idx``/``rejected_idx``)
and the key each sequence has in the reference cache, and splits itself into micro-batches of
at most ``--token-budget`` forwarded tokens. No model here: only lists and the packing plan.
"""

from __future__ import annotations

from typing import Sequence

from train.data import TaskExample
from train.packing import plan_packing


class Batch:
    """The token sequences of a batch of tasks and where each loss term finds its part."""

    def __init__(self, tasks: Sequence[TaskExample], *, use_sft: bool, use_pairs: bool):
        self.sequences: list[list[int]] = []
        self.sft_idx: list[int] = []
        self.sft: list = []
        self.chosen_idx: list[int] = []
        self.rejected_idx: list[int] = []
        self.pairs: list = []
        self.keys: list[tuple[str, str, int]] = []  # (task, role, index) for the reference cache
        for t in tasks:
            if use_sft:
                for i, s in enumerate(t.sft):
                    if len(s.input_ids) < 2:
                        continue
                    self._add_sft(s, (t.task, "sft", i))
            if use_pairs:
                for i, p in enumerate(t.pairs):
                    self._add_pair(p, (t.task, "chosen", i), (t.task, "rejected", i))

    def _add_sft(self, s, key) -> None:
        self.sft_idx.append(len(self.sequences))
        self.sequences.append(s.input_ids)
        self.sft.append(s)
        self.keys.append(key)

    def _add_pair(self, p, ckey, rkey) -> None:
        self.chosen_idx.append(len(self.sequences))
        self.sequences.append(p.chosen_ids)
        self.keys.append(ckey)
        self.rejected_idx.append(len(self.sequences))
        self.sequences.append(p.rejected_ids)
        self.keys.append(rkey)
        self.pairs.append(p)

    def kl_masks(self) -> list[list[bool]]:
        """Per sequence, which predictions the reference KL covers: the model-written
        targets of the SFT paths; nothing on the DPO sequences."""
        masks: list[list[bool]] = [[False] * (len(s) - 1) for s in self.sequences]
        for i, s in zip(self.sft_idx, self.sft):
            masks[i] = [bool(m) for m in s.model_mask[1:]]
        return masks

    def logp_masks(self, *, sft: bool, model_tokens: bool) -> list[list[bool]]:
        """Per sequence, which token log-probs a loss reads (`token_logprobs`' ``logp_masks``):
        each DPO sequence's span (chosen or rejected; ORPO's NLL and the first-token weight
        read the same spans), and on the SFT paths the weighted targets (``sft``: the SFT
        term) and the model-written ones (``model_tokens``: the one-token KL)."""
        masks: list[list[bool]] = [[False] * (len(s) - 1) for s in self.sequences]
        for i, s in zip(self.sft_idx, self.sft):
            masks[i] = [(sft and float(w) > 0) or (model_tokens and bool(m))
                        for w, m in zip(s.weights[1:], s.model_mask[1:])]
        for p, c, r in zip(self.pairs, self.chosen_idx, self.rejected_idx):
            for i, (a, b) in ((c, p.chosen_span), (r, p.rejected_span)):
                masks[i][a:b] = [True] * (b - a)
        return masks

    def norms(self) -> dict[str, float]:
        """The denominators of the batch's mean loss terms (the loss of a micro-batch is its
        share of the batch's: its sums over these)."""
        return {
            "sft_weight": float(sum(sum(float(w) for w in s.weights[1:]) for s in self.sft)),
            "kl_tokens": float(sum(sum(float(m) for m in s.model_mask[1:]) for s in self.sft)),
            "kl_positions": float(sum(sum(1 for m in s.model_mask[1:] if m) for s in self.sft)),
            "pairs": float(len(self.pairs)),
        }

    def _units(self) -> list[tuple[str, int]]:
        """SFT paths and DPO pairs (chosen + rejected stay together) in sequence order."""
        first = {i: ("sft", k) for k, i in enumerate(self.sft_idx)}
        first.update({i: ("pair", k) for k, i in enumerate(self.chosen_idx)})
        return [first[i] for i in sorted(first)]

    def split(self, token_budget: int, packing: str) -> list["Batch"]:
        """Micro-batches whose packed forward (``plan_packing(..., packing, token_budget)``)
        holds at most ``token_budget`` tokens, units in order so that a task's sequences
        stay together and keep sharing their prefixes. A unit (an SFT path, or a DPO pair)
        larger than the budget gets a micro-batch of its own."""
        out: list[Batch] = []
        cur: Batch | None = None
        for kind, k in self._units():
            seqs = [self.sequences[self.sft_idx[k]]] if kind == "sft" else \
                [self.sequences[self.chosen_idx[k]], self.sequences[self.rejected_idx[k]]]
            if cur is not None and forwarded_tokens(cur.sequences + seqs, packing, token_budget) > token_budget:
                out.append(cur)
                cur = None
            if cur is None:
                cur = Batch([], use_sft=False, use_pairs=False)
            if kind == "sft":
                i = self.sft_idx[k]
                cur._add_sft(self.sft[k], self.keys[i])
            else:
                cur._add_pair(self.pairs[k], self.keys[self.chosen_idx[k]], self.keys[self.rejected_idx[k]])
        if cur is not None:
            out.append(cur)
        return out


def forwarded_tokens(sequences: list[list[int]], packing: str, token_budget: int) -> int:
    """Tokens one ``token_logprobs`` call forwards for these sequences (padding included)."""
    live = [s for s in sequences if len(s) > 1]
    return plan_packing(live, packing=packing, token_budget=token_budget).tokens_forwarded if live else 0
