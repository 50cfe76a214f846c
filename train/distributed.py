"""What a run needs when its parameters are sharded across processes (FSDP, FSDP2, ZeRO-3).

Under DDP (and ZeRO-2) every rank holds the whole model: the unwrapped model computes the
right numbers on its own, and `train.trainer` runs the reference passes on it without any
collective. Under FSDP and ZeRO-3 a rank holds a shard of each weight between forwards:

* every forward must go through the wrapper (which gathers a layer's weights before it runs
  and frees them after), the reference passes too: `ShardedForward` is the model that
  ``token_logprobs`` calls, forward through the wrapper, attributes from the inner model;
* the gathers are collectives, so every rank must forward as many times as the others, or
  the one with more forwards waits forever: `ShardedForward` keeps the ranks in lockstep, one
  forward each per round, and the ranks with fewer forwards (a shorter batch, an empty one,
  fewer reference tasks) run a two-token row in the rounds they have nothing for;
* the output layer's weight is not there after the forward, so the chunked log-prob path
  (which reads it then) is off (`lm_head_of` sees ``params_sharded``) and the plain path runs;
* the LoRA is gathered before it is saved (`gathered_lora_state`), on every rank at once.

`finish_process_group` ends a run's process group at the end of the command, so no rank
hangs at interpreter exit on a group nobody destroyed.
"""

from __future__ import annotations

import contextlib
import gc
import logging
from typing import Any, Iterator

import torch

log = logging.getLogger(__name__)

#: token ids of the row a padding forward runs (any id below every vocabulary size)
PAD_ROW = (0, 0)


def _dist_ready() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def shards_parameters(accelerator) -> bool:
    """Whether ``accelerator`` (an ``accelerate.Accelerator``) runs FSDP (1 or 2) or DeepSpeed
    ZeRO-3: a rank holds only a shard of each weight between forwards."""
    from accelerate.utils import DistributedType

    kind = getattr(accelerator, "distributed_type", None)
    if kind == DistributedType.FSDP:
        return True
    if kind == DistributedType.DEEPSPEED:
        plugin = getattr(accelerator.state, "deepspeed_plugin", None)
        return getattr(plugin, "zero_stage", 0) == 3
    return False


class ShardedForward:
    """The model as ``token_logprobs`` and the evaluation call it when parameters are sharded.

    Calls go through ``wrapper`` (FSDP/DeepSpeed gather the weights there); every other
    attribute (config, ``disable_adapter``, ``get_base_model``, parameters) comes from
    ``inner``, the peft model; ``train``/``eval`` set the wrapper's mode (and so the inner
    model's).

    Lockstep: a forward's weight gathers are collectives, so every rank must forward as often
    as the others, in the same order, and as often with grad (those take part in the
    backward's reduce-scatter). How many forwards a rank makes depends on its batch (rows,
    micro-batches, an empty batch), so before each forward the ranks agree what this round is
    (`_round`: an all-reduce of one number: 2 someone forwards with grad, 1 without, 0 nobody).
    A rank that has nothing of that kind to forward runs a two-token row instead (`_dummy`),
    and `pad` keeps a rank doing so until every rank is done. One small all-reduce per forward
    is the price."""

    params_sharded = True

    def __init__(self, wrapper, inner, device) -> None:
        self._wrapper = wrapper
        self._inner = inner
        self._device = torch.device(device)
        self._extra: torch.Tensor | None = None
        self.dummies = 0  #: padding forwards run so far (tests read it)

    def __call__(self, *args, **kwargs):
        want = 2 if torch.is_grad_enabled() else 1
        if _dist_ready():
            while (r := self._round(want)) != want:  # another rank forwards with grad first
                self._dummy(grad=r == 2)
        return self._wrapper(*args, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self._inner, name)

    @property
    def training(self) -> bool:
        return self._wrapper.training

    def train(self, mode: bool = True) -> "ShardedForward":
        self._wrapper.train(mode)
        return self

    def eval(self) -> "ShardedForward":
        return self.train(False)

    def _round(self, want: int) -> int:
        flag = torch.tensor([want], dtype=torch.int64, device=self._device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return int(flag.item())

    def _dummy(self, grad: bool) -> None:
        ids = torch.tensor([PAD_ROW], dtype=torch.long, device=self._device)
        self.dummies += 1
        # with grad, through the adapter even while this rank's own pass has it disabled: the
        # other ranks' real rows give the LoRA weights a gradient, which FSDP reduce-scatters
        # only where every rank has one
        with torch.enable_grad() if grad else torch.no_grad(), _adapters_on(self._inner) if grad else _nothing():
            out = self._wrapper(input_ids=ids, use_cache=False).logits
            if grad:  # joins the backward through the loss (as 0), as the other ranks' real rows do
                z = out.float().sum() * 0.0  # in this block: a reference pass runs under no_grad
                self._extra = z if self._extra is None else self._extra + z
        del out

    def pad(self) -> torch.Tensor | None:
        """This rank is done forwarding for now: run padding forwards until every rank is
        (each rank must call it at the same point). Returns 0 times the logits of the padding
        forwards with grad, to add to the loss so they take part in the backward, or None when
        there were none. Without a process group: None."""
        if _dist_ready():
            while (r := self._round(0)) != 0:
                self._dummy(grad=r == 2)
        extra, self._extra = self._extra, None
        return extra


@contextlib.contextmanager
def _nothing() -> Iterator[None]:
    yield


@contextlib.contextmanager
def _adapters_on(model) -> Iterator[None]:
    """The LoRA layers of ``model`` enabled for the body (``disable_adapter`` turns them off
    and their weights' requires_grad with them), and put back as they were after."""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # pragma: no cover - peft is a dependency of the training extra
        yield
        return
    off = [m for m in model.modules() if isinstance(m, BaseTunerLayer) and m.disable_adapters]
    for m in off:
        m.enable_adapters(True)
    try:
        yield
    finally:
        for m in off:
            m.enable_adapters(False)


def gathered_lora_state(trainer) -> dict[str, torch.Tensor] | None:
    """The trainable (LoRA) tensors of ``trainer``'s model, whole, for `train.run` to save:
    ``{peft state-dict key: tensor}`` on rank 0, ``{}`` on the other ranks. None when the
    parameters are not sharded (then the unwrapped model holds them whole; save it).

    A collective: every rank must call it. FSDP (1 and 2): torch.distributed.checkpoint's
    ``get_model_state_dict`` with ``full_state_dict`` and ``ignore_frozen_params``, so only the
    LoRA weights are gathered, to the CPU. ZeRO-3: ``Accelerator.get_state_dict`` (needs
    ``stage3_gather_16bit_weights_on_model_save``, as configs/accelerate/zero3.json sets),
    then the LoRA keys of it."""
    acc = trainer.accelerator
    if not shards_parameters(acc):
        return None
    from accelerate.utils import DistributedType

    wrapped = trainer.model_wrapped
    if acc.distributed_type == DistributedType.FSDP:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
        state = get_model_state_dict(wrapped, options=opts)
    else:
        state = acc.get_state_dict(wrapped)
    if not trainer.is_world_process_zero():
        return {}
    out = {k: v.detach().float().cpu() for k, v in (state or {}).items() if ".lora_" in k}
    if not out:
        raise RuntimeError(f"the gathered state dict ({len(state or {})} tensors) holds no LoRA weight")
    return out


def finish_process_group(initialized_before: bool) -> None:
    """Destroy the default process group when this run initialized it (``initialized_before``:
    whether one existed when the run began), after a garbage collection so the DDP/FSDP
    objects that still reference it are freed first: a reducer freed after the group is
    destroyed hung the rank at exit."""
    if initialized_before or not _dist_ready():
        return
    gc.collect()
    try:
        torch.distributed.destroy_process_group()
    except Exception as exc:  # noqa: BLE001 - ending the run anyway; say why the group lingered
        log.warning("destroy_process_group failed: %s", exc)


def describe(accelerator) -> dict[str, Any]:
    """What metrics.json records about how the run was spread: the accelerate distributed
    type and whether the parameters were sharded."""
    return {"distributed_type": str(getattr(accelerator, "distributed_type", "NO")),
            "sharded_parameters": shards_parameters(accelerator)}
