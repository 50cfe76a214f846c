"""The reference model: the base with its LoRA adapter disabled, and its cached log-probs.

* `eval_mode` / `reference_mode`: the one way this package scores a model outside a
  training step: eval mode (no dropout), the adapter disabled for the reference (a no-op on a
  model without one), and the training flag restored afterwards.
* `ReferenceCache`: reference log-probs per (task, role, index), computed once before
  training (sharded over DDP ranks) and read by every step's DPO and one-token KL terms
  (only the positions those terms read are computed: `Batch.logp_masks`);
  with ``states`` also the reference's last hidden states at the positions the
  full-vocabulary KL covers, so a step needs no reference forward (single process, within
  `STATES_BYTES`).
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch

from train.batching import Batch
from train.config import TrainConfig
from train.data import TaskExample
from train.distributed import ShardedForward
from train.logprobs import token_logprobs

#: the most the cached reference hidden states may take (CPU memory); above it the trainer
#: recomputes the reference rows each step instead
STATES_BYTES = 2 << 30


@contextlib.contextmanager
def eval_mode(model, *, adapter: bool = True) -> Iterator[None]:
    """``model`` in eval mode for the body, with its LoRA adapter disabled when ``adapter`` is
    False (``disable_adapter()``; nothing to disable on a plain model); its training flag
    is restored afterwards, whatever happens."""
    was_training = model.training
    model.eval()
    try:
        with model.disable_adapter() if not adapter and hasattr(model, "disable_adapter") else contextlib.nullcontext():
            yield
    finally:
        model.train(was_training)


def reference_mode(model) -> contextlib.AbstractContextManager[None]:
    """The reference model: ``model`` in eval mode with its adapter disabled (`eval_mode`)."""
    return eval_mode(model, adapter=False)


class ReferenceCache:
    """Reference (adapter-disabled) log-probs per (task, role, index), on the CPU."""

    def __init__(self) -> None:
        self.logps: dict[tuple[str, str, int], torch.Tensor] = {}
        #: SFT key -> the reference's hidden states ``[n, H]`` at that path's KL positions
        self.states: dict[tuple[str, str, int], torch.Tensor] = {}

    def __contains__(self, key) -> bool:
        return key in self.logps

    def get(self, keys: Sequence[tuple[str, str, int]], device, *, sft: bool = True) -> list[torch.Tensor | None]:
        """The cached log-probs of ``keys``; ``None`` for the SFT paths when ``sft`` is
        False (only the one-token KL reads them, and then they were never computed)."""
        return [self.logps[k].to(device) if sft or k[1] != "sft" else None for k in keys]

    def states_of(self, keys: Sequence[tuple[str, str, int]], device) -> list[torch.Tensor] | None:
        """The cached reference hidden states of ``keys`` (SFT paths), or None unless all are."""
        if not all(k in self.states for k in keys):
            return None
        return [self.states[k].to(device) for k in keys]

    def _missing(self, task: TaskExample, use_sft: bool, use_pairs: bool, states: bool) -> bool:
        if any(k not in self.logps for k in Batch([task], use_sft=use_sft, use_pairs=use_pairs).keys):
            return True
        return states and any(k not in self.states for k in Batch([task], use_sft=True, use_pairs=False).keys)

    @torch.no_grad()
    def fill(self, model, tasks: Sequence[TaskExample], cfg: TrainConfig, use_sft: bool, use_pairs: bool,
             batch_size: int = 4, shard: bool = False, states: bool = False) -> None:
        """Compute missing reference log-probs, a few tasks per forward.

        ``states``: also keep the reference's hidden states at every SFT path's KL positions
        (`Batch.kl_masks`), the reference side of the full-vocabulary KL (single process only:
        they are not exchanged between ranks).

        ``shard`` (every rank calls it with the same tasks): under torch.distributed each rank
        computes every world-size-th task and the ranks exchange their results, so each
        log-prob is computed once, not once per rank. A `ShardedForward` model (FSDP/ZeRO-3)
        is padded to the busiest rank's forwards before the exchange."""
        todo = [t for t in tasks if self._missing(t, use_sft, use_pairs, states)]
        dist = torch.distributed
        world = dist.get_world_size() if shard and dist.is_available() and dist.is_initialized() else 1
        if states and world > 1:
            raise ValueError("ReferenceCache.fill: states are kept in single-process training only")
        if world > 1:
            todo = todo[dist.get_rank()::world]
            before = set(self.logps)
        self.computed = len(todo)
        with reference_mode(model):
            for i in range(0, len(todo), batch_size):
                b = Batch(todo[i : i + batch_size], use_sft=use_sft or states, use_pairs=use_pairs)
                if not b.sequences:
                    continue
                # the reference log-probs a step reads: the DPO spans, and with ``use_sft`` the
                # one-token KL's model-written targets (`SteerTrainer.sft_reference`)
                read = b.logp_masks(sft=False, model_tokens=use_sft)
                if states:
                    out, rows = token_logprobs(model, b.sequences, packing=cfg.packing, token_budget=cfg.token_budget,
                                               fallback=True, dist_masks=b.kl_masks(), dist_states=True,
                                               logp_masks=read)
                    for k, r in zip(b.keys, rows):
                        if k[1] == "sft" and hasattr(r, "hidden"):  # plain rows (no tapped head): not kept
                            self.states[k] = r.hidden.detach().cpu()
                else:
                    out = token_logprobs(model, b.sequences, packing=cfg.packing, token_budget=cfg.token_budget,
                                         fallback=True, logp_masks=read)
                for k, lp in zip(b.keys, out):
                    if use_sft or k[1] != "sft":  # SFT paths forwarded only for their states keep none
                        self.logps[k] = lp.detach().float().cpu()
        if world > 1 and isinstance(model, ShardedForward):
            model.pad()  # the weight gathers of every forward are collectives too
        if world > 1:
            mine = {k: v for k, v in self.logps.items() if k not in before}
            gathered: list = [None] * world
            dist.all_gather_object(gathered, mine)
            for part in gathered:
                self.logps.update(part)
