"""The ``transformers.Trainer`` of steer trees: a thin subclass, its dataset and its arguments.

* The dataset unit is one task (:class:`train.data.TaskExample`); the collator keeps token
  lists as they are (no padding: ``train.logprobs.token_logprobs`` packs them).
* ``compute_loss`` turns a batch into token sequences (`train.batching.Batch`: SFT paths,
  prefix+chosen, prefix+rejected), gets every sequence's per-token log-probs from **one**
  ``token_logprobs`` call per micro-batch, and combines the loss terms of ``train.losses``.
* Reference log-probs come from the same model with the LoRA adapter disabled
  (`train.reference`), computed once before training and cached per example. In one
  process the reference's hidden states at the full-KL positions are kept too
  (`SteerTrainer.keep_states`), so a step runs no reference forward at all.
* Because it is a plain ``Trainer``, ``accelerate launch`` / ``torchrun`` (DDP) work. Under
  FSDP/ZeRO-3 (parameters sharded between forwards) every forward, the reference's too, goes
  through the wrapper and the ranks forward equally often (`train.distributed`).

A whole ``steer-train`` run (data, model, outputs) is `train.run.run_training`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections import defaultdict
from typing import Any, Sequence

import torch
from accelerate.utils import DistributedType
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import get_last_checkpoint

from train.batching import Batch
from train.chunked import HeadStates
from train.config import TrainConfig
from train.data import TaskExample
from train.distributed import ShardedForward, gathered_lora_state, shards_parameters
from train.losses import (chosen_nll, dpo_loss, dpo_metrics, full_reference_kl, pad_logps, reference_kl, span_logps,
                          weighted_nll)
from train.logprobs import token_logprobs
from train.reference import STATES_BYTES, ReferenceCache, reference_mode

log = logging.getLogger(__name__)


class NonFiniteLoss(RuntimeError):
    """The loss became NaN/inf; training stops and the last good checkpoint is kept."""


class TaskDataset(torch.utils.data.Dataset):
    def __init__(self, tasks: Sequence[TaskExample]):
        self.tasks = list(tasks)

    def __len__(self) -> int:
        return len(self.tasks)

    def __getitem__(self, i: int) -> TaskExample:
        return self.tasks[i]


def collate_tasks(batch: list[TaskExample]) -> dict[str, Any]:
    """Keep examples as token lists; ``token_logprobs`` does the packing."""
    return {"tasks": list(batch)}


class _ForwardThrough:
    """Expose the inner model's attributes (config, parameters, peft helpers) but run the
    forward pass through the distributed wrapper, so DDP sees it and syncs gradients."""

    def __init__(self, wrapper, inner):
        self._wrapper = wrapper
        self._inner = inner

    def __call__(self, *args, **kwargs):
        return self._wrapper(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._inner, name)


# ----------------------------------------------------------------------------- trainer


class SteerTrainer(Trainer):
    """``Trainer`` whose loss is masked SFT + localized DPO + reference KL on steer trees."""

    def __init__(self, *args, steer_config: TrainConfig, reference: ReferenceCache | None = None, **kwargs):
        kwargs.setdefault("data_collator", collate_tasks)
        super().__init__(*args, **kwargs)
        self.steer_config = steer_config
        self.reference = reference or ReferenceCache()
        self._metrics: dict[str, list[float]] = defaultdict(list)
        self.history: list[dict[str, float]] = []
        self._pending_reference: list[Sequence[TaskExample]] = []
        self._keep_states = False  # set by prepare_reference (`keep_states`)
        self._sharded_fwd: ShardedForward | None = None

    @property
    def use_sft(self) -> bool:
        c = self.steer_config
        return "sft" in c.objective or c.kl_weight > 0

    @property
    def use_pairs(self) -> bool:
        return "dpo" in self.steer_config.objective

    @property
    def sft_reference(self) -> bool:
        """Whether the SFT paths need cached reference log-probs: only the one-token KL
        reads them (the full KL needs whole rows: `keep_states`)."""
        return self.steer_config.token_kl

    def keep_states(self, *datasets: Sequence[TaskExample]) -> bool:
        """Whether the reference side of the full KL is computed once and kept
        (`ReferenceCache.states`) rather than by a reference forward at every step: with the
        full KL, in one process, when the hidden states of every KL position of ``datasets``
        fit in `train.reference.STATES_BYTES`."""
        if not self.steer_config.full_kl or self.args.world_size > 1 or self.sharded:
            return False
        positions = sum(sum(s.model_mask[1:]) for ds in datasets for t in ds for s in t.sft)
        p = next(self.model.parameters())
        need = positions * int(self.model.config.hidden_size) * p.element_size()
        if need > STATES_BYTES:
            log.info("reference KL rows recomputed each step: keeping %d positions' hidden states would take %.1f GiB",
                     positions, need / 2**30)
            return False
        return True

    @property
    def sharded(self) -> bool:
        """Whether the parameters are sharded between forwards (FSDP 1/2, ZeRO-3)."""
        return shards_parameters(self.accelerator)

    def prepare_reference(self, *datasets: Sequence[TaskExample]) -> None:
        """Reference log-probs of ``datasets``, each computed once, split across the ranks.
        Under FSDP/ZeRO-3 they are computed at the first training step instead, through the
        wrapped model: before ``train()`` wraps it a rank's copy may be on the CPU or (with
        RAM-efficient loading) empty."""
        if self.sharded:
            self._pending_reference.extend(datasets)
            return
        self._keep_states = self.keep_states(*datasets)
        for ds in datasets:
            self.reference.fill(self.model, ds, self.steer_config, self.sft_reference, self.use_pairs, shard=True,
                                states=self._keep_states)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Under FSDP (checkpoints included) gather only the LoRA tensors, on every rank at once,
        and write them from rank 0 (`train.distributed.gathered_lora_state`); transformers'
        own FSDP path gathers every weight of the model to rank 0 to save the adapter."""
        from accelerate.utils import DistributedType

        if self.accelerator.distributed_type != DistributedType.FSDP:
            return super().save_model(output_dir, _internal_call)
        lora = gathered_lora_state(self)
        if self.args.should_save:
            self._save(output_dir or self.args.output_dir, state_dict=lora)

    def _models(self, model) -> tuple[Any, Any]:
        """``(inner, fwd)``: the unwrapped model, and what to call for a forward. Without
        sharding the reference passes call ``inner`` (no collective: a rank's DDP wrapper
        broadcasts buffers at a forward, which the other ranks would not join); with it
        everything calls ``fwd`` (a `ShardedForward` over the wrapper)."""
        inner = self.accelerator.unwrap_model(model)
        if self.sharded:
            f = self._sharded_fwd
            if f is None or f._wrapper is not model:
                f = self._sharded_fwd = ShardedForward(model, inner, self.args.device)
            return inner, f
        return inner, (inner if model is inner else _ForwardThrough(model, inner))

    def scoring_model(self):
        """The model to score with outside a training step (held-out evaluation): the
        trained model, or under FSDP/ZeRO-3 a `ShardedForward` over its wrapper (every rank
        must then score the same examples; `ShardedForward.pad` after)."""
        return self._models(self.model_wrapped)[1] if self.sharded else self.model

    # -- loss ------------------------------------------------------------------------------
    def training_step(self, *args, **kwargs):
        self._stepping = True
        try:
            return super().training_step(*args, **kwargs)
        finally:
            self._stepping = False

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The batch's loss, computed in micro-batches of at most ``token_budget`` forwarded
        tokens (`Batch.split`), each term normalised by the whole batch (`Batch.norms`), so
        the sum over micro-batches is the loss of the batch in one piece.

        Inside a training step with more than one micro-batch, every micro-batch but the last
        runs its backward here (under DDP's ``no_sync``), and the returned loss carries the
        last one's graph plus the others' values: memory holds one micro-batch's graph at a
        time, the gradient is the whole batch's, and each rank syncs once per step."""
        cfg = self.steer_config
        tasks: list[TaskExample] = inputs["tasks"]
        inner, fwd = self._models(model)
        ref_model = fwd if self.sharded else inner
        while self._pending_reference:  # under FSDP/ZeRO-3: the first step, every rank at once
            self.reference.fill(fwd, self._pending_reference.pop(0), cfg, self.sft_reference, self.use_pairs,
                                shard=True)
        batch = Batch(tasks, use_sft=self.use_sft, use_pairs=self.use_pairs)
        missing = [k for k in batch.keys if k not in self.reference and (self.sft_reference or k[1] != "sft")]
        if missing:  # examples not seen by prepare_reference (e.g. a custom dataset)
            self.reference.fill(ref_model, tasks, cfg, self.sft_reference, self.use_pairs, states=self._keep_states)
        if not batch.sequences:
            # Nothing to learn here, but under DDP the other ranks' backward waits for this
            # rank's gradient all-reduce, which only a forward through the wrapper arms: forward
            # two tokens and return 0 with their graph. The finite check's all_reduce likewise.
            lp = token_logprobs(fwd, [[0, 0]], packing=cfg.packing, token_budget=cfg.token_budget, fallback=True)[0]
            loss = self._padded(fwd, lp.sum() * 0.0)
            self._check_finite(loss)
            return (loss, {}) if return_outputs else loss
        norms = batch.norms()
        micro = batch.split(cfg.token_budget, cfg.packing)
        # one backward per step under DeepSpeed and FSDP/ZeRO-3 (there every rank must run as
        # many forwards and backwards as the others; the padding evens out only forwards)
        early = (getattr(self, "_stepping", False) and len(micro) > 1 and torch.is_grad_enabled()
                 and self.accelerator.distributed_type != DistributedType.DEEPSPEED and not self.sharded)
        done = None  # values of the micro-batches whose backward already ran
        total = None
        metrics: dict[str, float] = defaultdict(float)
        for k, mb in enumerate(micro):
            last = k == len(micro) - 1
            sync = contextlib.nullcontext() if last or not early else self.accelerator.no_sync(model)
            with sync:
                terms = self.micro_loss(ref_model, fwd, mb, norms)
                loss = terms.pop("loss")
                for key, v in terms.items():
                    metrics[key] += float(v)
                if early and not last:
                    with torch.autocast(loss.device.type, enabled=False):
                        self.accelerator.backward(loss / self._ga_divisor(num_items_in_batch))
                    done = loss.detach() if done is None else done + loss.detach()
                    continue
            total = loss if total is None else total + loss
        if done is not None:  # the value of the whole batch; the gradient of the last micro-batch
            total = total + done
        total = self._padded(fwd, total)
        self._check_finite(total)
        for key, v in metrics.items():
            self._metrics[key].append(v)
        return (total, {}) if return_outputs else total

    @staticmethod
    def _padded(fwd, loss: torch.Tensor) -> torch.Tensor:
        """``loss`` plus the zero-valued padding forwards of a `ShardedForward` (a no-op for
        other models), so this rank forwards and back-propagates as often as the others."""
        extra = fwd.pad() if isinstance(fwd, ShardedForward) else None
        return loss if extra is None else loss + extra.to(loss.device)

    def _ga_divisor(self, num_items_in_batch) -> float:
        """What ``Trainer.training_step`` divides the returned loss by before its backward."""
        scaled = getattr(self, "loss_is_scaled_for_ga", None)
        if scaled is None:
            scaled = (getattr(self, "model_accepts_loss_kwargs", False) and num_items_in_batch is not None) \
                or getattr(self, "compute_loss_func", None) is not None
        return 1.0 if scaled else float(getattr(self, "current_gradient_accumulation_steps", 1) or 1)

    def micro_loss(self, inner, fwd, batch: Batch, norms: dict[str, float]) -> dict[str, Any]:
        """One micro-batch: forward, reference rows, loss terms (its share of the batch's).
        ``inner`` runs the reference (adapter-disabled) forward, ``fwd`` the policy's."""
        cfg = self.steer_config
        full_kl = cfg.full_kl and bool(batch.sft_idx)
        dists = None
        read = batch.logp_masks(sft="sft" in cfg.objective, model_tokens=cfg.token_kl)
        if full_kl:
            masks = batch.kl_masks()
            logps, dists = token_logprobs(fwd, batch.sequences, packing=cfg.packing, token_budget=cfg.token_budget,
                                          fallback=True, dist_masks=masks, dist_states=True, logp_masks=read)
        else:
            logps = token_logprobs(fwd, batch.sequences, packing=cfg.packing, token_budget=cfg.token_budget,
                                   fallback=True, logp_masks=read)
        device = logps[0].device
        ref = self.reference.get(batch.keys, device, sft=self.sft_reference)
        terms = self.loss_terms(batch, logps, ref, device, norms)
        if dists is not None:
            ref_dists = self.cached_reference_dists(batch, [dists[i] for i in batch.sft_idx], device)
            if ref_dists is None:
                ref_dists = self.reference_dists(inner, batch, [masks[i] for i in batch.sft_idx])
            kl = full_reference_kl([dists[i] for i in batch.sft_idx], ref_dists, cfg.kl_direction)
            n = sum(len(r) for r in ref_dists)
            if n:
                kl = kl * (n / norms["kl_positions"])
                terms["loss"] = terms["loss"] + cfg.kl_weight * kl
                terms["kl"] = kl.detach()
        return terms

    def cached_reference_dists(self, batch: Batch, policy: list, device) -> list | None:
        """The reference side of the full KL from the kept hidden states (`keep_states`), with
        the policy's own output layer (LoRA never adapts it: checked, it must be frozen);
        None when they were not kept."""
        if not self._keep_states or not all(isinstance(d, HeadStates) for d in policy):
            return None
        if any(d.head.weight.requires_grad for d in policy):
            return None
        hs = self.reference.states_of([batch.keys[i] for i in batch.sft_idx], device)
        return None if hs is None else [HeadStates(h, d.head) for h, d in zip(hs, policy)]

    @torch.no_grad()
    def reference_dists(self, model, batch: Batch, masks: list) -> list:
        """The base model's full distributions at the flagged positions of the SFT
        sequences (adapter disabled, eval mode, no grad): the other side of the full KL, as
        `train.chunked.HeadStates` (or log-softmax rows when the output layer is not tapped)."""
        cfg = self.steer_config
        with reference_mode(model):
            _, rows = token_logprobs(model, [batch.sequences[i] for i in batch.sft_idx], packing=cfg.packing,
                                     token_budget=cfg.token_budget, fallback=True, dist_masks=masks,
                                     dist_states=True, logp_masks=[[False] * len(m) for m in masks])
        return rows

    def loss_terms(self, batch: Batch, logps: list[torch.Tensor], ref: list[torch.Tensor | None],
                   device, norms: dict[str, float] | None = None) -> dict[str, Any]:
        """Combine the loss terms of one batch; returns ``loss`` (scalar) and float metrics.

        ``norms``: the denominators of the whole batch when ``batch`` is one of its
        micro-batches (`Batch.norms`); each mean term is then scaled by this micro-batch's
        share, so the terms of all micro-batches add up to the batch's."""
        cfg = self.steer_config
        own = batch.norms()
        norms = norms or own

        def share(key: str) -> float:
            return own[key] / norms[key] if norms[key] > 0 else 0.0

        out: dict[str, Any] = {}
        loss = logps[0].sum() * 0.0
        if batch.sft_idx:
            pol = pad_logps([logps[i] for i in batch.sft_idx])
            w = pad_logps([torch.tensor(s.weights[1:], dtype=torch.float32, device=device) for s in batch.sft])
            mm = pad_logps([torch.tensor(s.model_mask[1:], dtype=torch.float32, device=device) for s in batch.sft])
            if "sft" in cfg.objective and bool((w > 0).any()):
                sft = weighted_nll(pol, w, normalize="token") * share("sft_weight")
                loss = loss + cfg.sft_weight * sft
                out["sft_loss"] = sft.detach()
            if cfg.token_kl and bool((mm > 0).any()):
                kl = reference_kl(pol, pad_logps([ref[i] for i in batch.sft_idx]), mm) * share("kl_tokens")
                loss = loss + cfg.kl_weight * kl
                out["kl"] = kl.detach()
        if batch.pairs:
            c_spans = [p.chosen_span for p in batch.pairs]
            r_spans = [p.rejected_span for p in batch.pairs]
            fw = cfg.first_token_weight
            pc, lc = span_logps([logps[i] for i in batch.chosen_idx], c_spans, first_weight=fw)
            pr, lr = span_logps([logps[i] for i in batch.rejected_idx], r_spans, first_weight=fw)
            rc, _ = span_logps([ref[i] for i in batch.chosen_idx], c_spans, first_weight=fw)
            rr, _ = span_logps([ref[i] for i in batch.rejected_idx], r_spans, first_weight=fw)
            lc, lr = lc.to(device), lr.to(device)
            if cfg.length_normalize:
                pc, rc = pc / lc.clamp_min(1), rc / lc.clamp_min(1)
                pr, rr = pr / lr.clamp_min(1), rr / lr.clamp_min(1)
            d = dpo_loss(pc, pr, rc, rr, beta=cfg.beta, loss_type=cfg.loss_type, label_smoothing=cfg.label_smoothing,
                         lengths=(lc, lr) if not cfg.length_normalize else (torch.ones_like(lc), torch.ones_like(lr)))
            f = share("pairs")
            dpo = d.losses.mean() * f
            loss = loss + cfg.dpo_weight * dpo
            out["dpo_loss"] = dpo.detach()
            rpo_alpha = cfg.rpo_alpha or (1.0 if cfg.loss_type == "orpo" else 0.0)  # ORPO = NLL + odds ratio
            if rpo_alpha > 0:
                rpo = chosen_nll(pc * (lc if cfg.length_normalize else 1), lc).mean() * f
                loss = loss + rpo_alpha * rpo
                out["rpo_loss"] = rpo.detach()
            for k, v in dpo_metrics(d).items():
                out[k] = v * f
        out["loss"] = loss
        return out

    def _check_finite(self, loss: torch.Tensor) -> None:
        bad = torch.tensor([0.0 if torch.isfinite(loss.detach()).all() else 1.0], device=loss.device)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(bad)
        if bad.item() > 0:
            last = last_checkpoint(self.args.output_dir)
            raise NonFiniteLoss(
                f"loss became {float(loss.detach())} at step {self.state.global_step}; stopping. "
                + (f"The last good checkpoint is {last}." if last else "No checkpoint was written yet.")
                + " Try a lower --lr or --beta, or fp32."
            )

    # -- logging ---------------------------------------------------------------------------
    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if self._metrics and "loss" in logs:
            for k, vals in self._metrics.items():
                logs[k] = sum(vals) / len(vals)
            self._metrics.clear()
        if "loss" in logs:
            self.history.append({"step": self.state.global_step, **{k: float(v) for k, v in logs.items()
                                                                     if isinstance(v, (int, float))}})
        super().log(logs, *args, **kwargs)


class StopOnNonFinite(TrainerCallback):
    """Never save a checkpoint whose last logged loss was not finite."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(loss):
            control.should_save = False
            control.should_training_stop = True


def last_checkpoint(output_dir: str | None) -> str | None:
    """The newest ``checkpoint-N`` directory in ``output_dir``, or None (none yet, or no directory)."""
    return get_last_checkpoint(output_dir) if output_dir and os.path.isdir(output_dir) else None


def training_arguments(cfg: TrainConfig, out_dir, **extra: Any):
    """TrainingArguments for a run in ``out_dir`` (checkpoints in ``out_dir/checkpoints``,
    TensorBoard events in ``out_dir/tensorboard``: transformers 5 reads that directory from
    ``TENSORBOARD_LOGGING_DIR``, it has no ``logging_dir`` argument).

    ``extra``: more TrainingArguments fields, or replacements for those derived from ``cfg``.
    Every name is passed through: one that TrainingArguments does not have (misspelt, or
    removed in this transformers) raises TypeError naming it, never silently dropped."""
    from transformers import TrainingArguments

    cuda = torch.cuda.is_available()
    bf16 = cfg.bf16 if cfg.bf16 is not None else bool(cuda and torch.cuda.is_bf16_supported())
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(out_dir / "tensorboard")
    kw = dict(
        output_dir=str(out_dir / "checkpoints"),
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.lr,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps,
        lr_scheduler_type=cfg.scheduler,
        warmup_steps=cfg.warmup_ratio,  # a float < 1 is a ratio of the total steps in transformers 5
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        logging_steps=cfg.logging_steps,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit,
        seed=cfg.seed,
        data_seed=cfg.seed,
        bf16=bf16,
        use_cpu=not cuda,
        report_to=["tensorboard"],
        remove_unused_columns=False,
        dataloader_num_workers=0,
        disable_tqdm=not cfg.progress,
        ddp_find_unused_parameters=False,
    )
    kw.update(extra)
    unknown = sorted(set(kw) - set(TrainingArguments.__dataclass_fields__))
    if unknown:
        raise TypeError(f"TrainingArguments has no field {', '.join(map(repr, unknown))}")
    return TrainingArguments(**kw)
