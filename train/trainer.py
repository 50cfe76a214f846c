"""A thin ``transformers.Trainer`` subclass for steer trees.

* The dataset unit is one task (:class:`train.data.TaskExample`); the collator keeps token
  lists as they are (no padding: ``train.packing.token_logprobs`` packs them).
* ``compute_loss`` turns a batch into token sequences (SFT paths, prefix+chosen,
  prefix+rejected), gets every sequence's per-token log-probs from **one**
  ``token_logprobs`` call, and combines the loss terms of ``train.losses``.
* Reference log-probs come from the same model with the LoRA adapter disabled
  (``disable_adapter()``), computed once before training and cached per example.
* Because it is a plain ``Trainer``, ``accelerate launch`` / ``torchrun`` (DDP) work.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections import defaultdict
from typing import Any, Sequence

import torch
from accelerate.utils import DistributedType
from transformers import Trainer, TrainerCallback

from train.config import ConfigError, TrainConfig, parse_layers
from train.data import TaskExample
from train.losses import (chosen_nll, dpo_loss, dpo_metrics, full_reference_kl, pad_logps, reference_kl, span_logps,
                          weighted_nll)
from train.packing import plan_packing, token_logprobs

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


# ----------------------------------------------------------------------------- sequences


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
            if cur is not None and _forwarded(cur.sequences + seqs, packing, token_budget) > token_budget:
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


def _forwarded(sequences: list[list[int]], packing: str, token_budget: int) -> int:
    """Tokens one ``token_logprobs`` call forwards for these sequences (padding included)."""
    live = [s for s in sequences if len(s) > 1]
    return plan_packing(live, packing=packing, token_budget=token_budget).tokens_forwarded if live else 0


class ReferenceCache:
    """Reference (adapter-disabled) log-probs per (task, role, index), on the CPU."""

    def __init__(self) -> None:
        self.logps: dict[tuple[str, str, int], torch.Tensor] = {}

    def __contains__(self, key) -> bool:
        return key in self.logps

    def get(self, keys: Sequence[tuple[str, str, int]], device, *, sft: bool = True) -> list[torch.Tensor | None]:
        """The cached log-probs of ``keys``; ``None`` for the SFT paths when ``sft`` is
        False (only the one-token KL reads them, and then they were never computed)."""
        return [self.logps[k].to(device) if sft or k[1] != "sft" else None for k in keys]

    @torch.no_grad()
    def fill(self, model, tasks: Sequence[TaskExample], cfg: TrainConfig, use_sft: bool, use_pairs: bool,
             batch_size: int = 4, shard: bool = False) -> None:
        """Compute missing reference log-probs, a few tasks per forward.

        ``shard`` (every rank calls it with the same tasks): under torch.distributed each rank
        computes every world-size-th task and the ranks exchange their results, so each
        log-prob is computed once, not once per rank."""
        todo = [t for t in tasks if any(k not in self.logps for k in Batch([t], use_sft=use_sft, use_pairs=use_pairs).keys)]
        dist = torch.distributed
        world = dist.get_world_size() if shard and dist.is_available() and dist.is_initialized() else 1
        if world > 1:
            todo = todo[dist.get_rank()::world]
            before = set(self.logps)
        self.computed = len(todo)
        was_training = model.training
        model.eval()
        try:
            with _adapter_disabled(model):
                for i in range(0, len(todo), batch_size):
                    b = Batch(todo[i : i + batch_size], use_sft=use_sft, use_pairs=use_pairs)
                    if not b.sequences:
                        continue
                    out = token_logprobs(model, b.sequences, packing=cfg.packing, token_budget=cfg.token_budget,
                                         fallback=True)
                    for k, lp in zip(b.keys, out):
                        self.logps[k] = lp.detach().float().cpu()
        finally:
            model.train(was_training)
        if world > 1:
            mine = {k: v for k, v in self.logps.items() if k not in before}
            gathered: list = [None] * world
            dist.all_gather_object(gathered, mine)
            for part in gathered:
                self.logps.update(part)


class _adapter_disabled:
    """``model.disable_adapter()`` for a peft model; a no-op for a plain model."""

    def __init__(self, model):
        self.ctx = model.disable_adapter() if hasattr(model, "disable_adapter") else None

    def __enter__(self):
        if self.ctx is not None:
            self.ctx.__enter__()

    def __exit__(self, *exc):
        if self.ctx is not None:
            return self.ctx.__exit__(*exc)
        return False


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
        reads them (the full KL recomputes whole rows each step)."""
        c = self.steer_config
        return c.kl_weight > 0 and c.kl_mode == "token"

    def prepare_reference(self, *datasets: Sequence[TaskExample]) -> None:
        model = self.model
        for ds in datasets:
            self.reference.fill(model, ds, self.steer_config, self.sft_reference, self.use_pairs, shard=True)

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
        inner = self.accelerator.unwrap_model(model)
        fwd = inner if model is inner else _ForwardThrough(model, inner)
        batch = Batch(tasks, use_sft=self.use_sft, use_pairs=self.use_pairs)
        missing = [k for k in batch.keys if k not in self.reference and (self.sft_reference or k[1] != "sft")]
        if missing:  # examples not seen by prepare_reference (e.g. a custom dataset)
            self.reference.fill(inner, tasks, cfg, self.sft_reference, self.use_pairs)
        if not batch.sequences:
            # Nothing to learn here, but under DDP the other ranks' backward waits for this
            # rank's gradient all-reduce, which only a forward through the wrapper arms: forward
            # two tokens and return 0 with their graph. The finite check's all_reduce likewise.
            lp = token_logprobs(fwd, [[0, 0]], packing=cfg.packing, token_budget=cfg.token_budget, fallback=True)[0]
            loss = lp.sum() * 0.0
            self._check_finite(loss)
            return (loss, {}) if return_outputs else loss
        norms = batch.norms()
        micro = batch.split(cfg.token_budget, cfg.packing)
        early = (getattr(self, "_stepping", False) and len(micro) > 1 and torch.is_grad_enabled()
                 and self.accelerator.distributed_type != DistributedType.DEEPSPEED)
        done = None  # values of the micro-batches whose backward already ran
        total = None
        metrics: dict[str, float] = defaultdict(float)
        for k, mb in enumerate(micro):
            last = k == len(micro) - 1
            sync = contextlib.nullcontext() if last or not early else self.accelerator.no_sync(model)
            with sync:
                terms = self.micro_loss(inner, fwd, mb, norms)
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
        self._check_finite(total)
        for key, v in metrics.items():
            self._metrics[key].append(v)
        return (total, {}) if return_outputs else total

    def _ga_divisor(self, num_items_in_batch) -> float:
        """What ``Trainer.training_step`` divides the returned loss by before its backward."""
        scaled = getattr(self, "loss_is_scaled_for_ga", None)
        if scaled is None:
            scaled = (getattr(self, "model_accepts_loss_kwargs", False) and num_items_in_batch is not None) \
                or getattr(self, "compute_loss_func", None) is not None
        return 1.0 if scaled else float(getattr(self, "current_gradient_accumulation_steps", 1) or 1)

    def micro_loss(self, inner, fwd, batch: Batch, norms: dict[str, float]) -> dict[str, Any]:
        """One micro-batch: forward, reference rows, loss terms (its share of the batch's)."""
        cfg = self.steer_config
        full_kl = cfg.kl_weight > 0 and cfg.kl_mode == "full" and bool(batch.sft_idx)
        dists = None
        if full_kl:
            masks = batch.kl_masks()
            logps, dists = token_logprobs(fwd, batch.sequences, packing=cfg.packing, token_budget=cfg.token_budget,
                                          fallback=True, dist_masks=masks, dist_states=True)
        else:
            logps = token_logprobs(fwd, batch.sequences, packing=cfg.packing, token_budget=cfg.token_budget,
                                   fallback=True)
        device = logps[0].device
        ref = self.reference.get(batch.keys, device, sft=self.sft_reference)
        terms = self.loss_terms(batch, logps, ref, device, norms)
        if dists is not None:
            ref_dists = self.reference_dists(inner, batch, [masks[i] for i in batch.sft_idx])
            kl = full_reference_kl([dists[i] for i in batch.sft_idx], ref_dists)
            n = sum(len(r) for r in ref_dists)
            if n:
                kl = kl * (n / norms["kl_positions"])
                terms["loss"] = terms["loss"] + cfg.kl_weight * kl
                terms["kl"] = kl.detach()
        return terms

    @torch.no_grad()
    def reference_dists(self, model, batch: Batch, masks: list) -> list:
        """The base model's full distributions at the flagged positions of the SFT
        sequences (adapter disabled, eval mode, no grad): the other side of the full KL, as
        `train.chunked.HeadStates` (or log-softmax rows when the output layer is not tapped)."""
        cfg = self.steer_config
        was_training = model.training
        model.eval()
        try:
            with _adapter_disabled(model):
                _, rows = token_logprobs(model, [batch.sequences[i] for i in batch.sft_idx], packing=cfg.packing,
                                         token_budget=cfg.token_budget, fallback=True, dist_masks=masks,
                                         dist_states=True)
        finally:
            model.train(was_training)
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
            if cfg.kl_weight > 0 and cfg.kl_mode == "token" and bool((mm > 0).any()):
                kl = reference_kl(pol, pad_logps([ref[i] for i in batch.sft_idx]), mm) * share("kl_tokens")
                loss = loss + cfg.kl_weight * kl
                out["kl"] = kl.detach()
        if batch.pairs:
            c_spans = [p.chosen_span for p in batch.pairs]
            r_spans = [p.rejected_span for p in batch.pairs]
            pc, lc = span_logps([logps[i] for i in batch.chosen_idx], c_spans)
            pr, lr = span_logps([logps[i] for i in batch.rejected_idx], r_spans)
            rc, _ = span_logps([ref[i] for i in batch.chosen_idx], c_spans)
            rr, _ = span_logps([ref[i] for i in batch.rejected_idx], r_spans)
            lc, lr = lc.to(device), lr.to(device)
            if cfg.length_normalize:
                pc, rc = pc / lc.clamp_min(1), rc / lc.clamp_min(1)
                pr, rr = pr / lr.clamp_min(1), rr / lr.clamp_min(1)
            d = dpo_loss(pc, pr, rc, rr, beta=cfg.beta, loss_type=cfg.loss_type, label_smoothing=cfg.label_smoothing)
            f = share("pairs")
            dpo = d.losses.mean() * f
            loss = loss + cfg.dpo_weight * dpo
            out["dpo_loss"] = dpo.detach()
            if cfg.rpo_alpha > 0:
                rpo = chosen_nll(pc * (lc if cfg.length_normalize else 1), lc).mean() * f
                loss = loss + cfg.rpo_alpha * rpo
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
            last = self._last_checkpoint()
            raise NonFiniteLoss(
                f"loss became {float(loss.detach())} at step {self.state.global_step}; stopping. "
                + (f"The last good checkpoint is {last}." if last else "No checkpoint was written yet.")
                + " Try a lower --lr or --beta, or fp32."
            )

    def _last_checkpoint(self) -> str | None:
        from transformers.trainer_utils import get_last_checkpoint
        import os

        d = self.args.output_dir
        return get_last_checkpoint(d) if d and os.path.isdir(d) else None

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


# ----------------------------------------------------------------------------- a whole run


def _is_main() -> bool:
    return int(__import__("os").environ.get("RANK", "0")) == 0


ATTN_NAMES = {"sdpa": "sdpa", "flex": "flex_attention", "eager": "eager"}


def _softcaps_attention(model) -> bool:
    cfg = getattr(model, "config", None)
    subs = [cfg, getattr(cfg, "text_config", None)]
    return any(getattr(c, "attn_logit_softcapping", None) for c in subs if c is not None)


def resolve_attn_impl(model, requested: str = "auto", device: str | None = None) -> str:
    """The transformers ``attn_implementation`` for ``--attn-impl``.

    ``auto``: ``sdpa`` (on CUDA it runs the memory-efficient kernel with the tree mask; on the
    CPU the fused flash kernel or the math path), except for models that softcap attention
    scores (Gemma-2), which SDPA cannot: ``flex_attention`` on CUDA (a ``score_mod``), else
    ``eager``. ``flex`` needs a backward, which FlexAttention has only on GPUs: refused on the
    CPU with that reason."""
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "auto":
        if _softcaps_attention(model):
            return "flex_attention" if dev.type == "cuda" and _has_flex() else "eager"
        return "sdpa"
    if requested not in ATTN_NAMES:
        raise ConfigError(f"--attn-impl: must be one of auto, {', '.join(ATTN_NAMES)}, not {requested!r}")
    if requested == "flex":
        if not _has_flex():
            raise ConfigError(f"--attn-impl flex: torch {torch.__version__} has no FlexAttention")
        if dev.type != "cuda":
            raise ConfigError(f"--attn-impl flex: FlexAttention has no backward on {dev.type} in torch "
                              f"{torch.__version__} (training needs one); use sdpa or eager")
    if requested == "sdpa" and _softcaps_attention(model):
        raise ConfigError("--attn-impl sdpa: this model softcaps attention scores, which SDPA cannot; "
                          "use eager (or flex on a GPU)")
    return ATTN_NAMES[requested]


def _has_flex() -> bool:
    try:
        from torch.nn.attention.flex_attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


def set_attn_impl(model, requested: str = "auto", device: str | None = None) -> str:
    """Switch ``model`` (before peft wraps it) to the resolved attention implementation."""
    name = resolve_attn_impl(model, requested, device)
    if getattr(model.config, "_attn_implementation", None) != name:
        model.set_attn_implementation(name)
    return name


def build_peft_model(model, cfg: TrainConfig):
    from peft import LoraConfig, get_peft_model

    from train.modeling import lora_target_modules

    targets = lora_target_modules(model, mlp=cfg.lora_mlp)
    n_layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    try:
        layers = parse_layers(cfg.lora_layers, n_layers)
    except ValueError as exc:
        raise ConfigError(f"--lora-layers {exc}") from None
    if layers == []:
        raise ConfigError(f"--lora-layers {cfg.lora_layers!r}: cannot tell how many layers {type(model).__name__} has")
    extra = {"layers_to_transform": layers} if layers is not None else {}
    lc = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                    target_modules=targets, bias="none", task_type="CAUSAL_LM", **extra)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    peft_model = get_peft_model(model, lc)
    fp32_trainable(peft_model)
    return peft_model


def weights_dtype(cfg: TrainConfig):
    """bf16 weights on a CUDA GPU that supports bf16 (unless ``--fp32``): an 8B model takes
    16 GB instead of 32, and under bf16 autocast the frozen Linear layers run on their own
    weights instead of a bf16 copy made (and saved for backward) at every forward. fp32
    elsewhere: CPUs run fp32 (no autocast there)."""
    use = cfg.bf16 if cfg.bf16 is not None else True
    return torch.bfloat16 if use and torch.cuda.is_available() and torch.cuda.is_bf16_supported() else None


def fp32_trainable(model) -> int:
    """Keep the trainable (LoRA) parameters in fp32, whatever the frozen weights' dtype: the
    optimizer updates an fp32 master (a 2e-4 step is below bf16's resolution for weights of
    size ~1). Returns how many tensors were cast."""
    n = 0
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32 and p.is_floating_point():
            p.data = p.data.float()
            n += 1
    return n


def training_arguments(cfg: TrainConfig, out_dir):
    """TrainingArguments for a run in ``out_dir`` (checkpoints in ``out_dir/checkpoints``,
    TensorBoard events in ``out_dir/tensorboard``)."""
    import os

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
        logging_dir=str(out_dir / "tensorboard"),
        remove_unused_columns=False,
        dataloader_num_workers=0,
        disable_tqdm=not cfg.progress,
        ddp_find_unused_parameters=False,
    )
    fields = TrainingArguments.__dataclass_fields__
    return TrainingArguments(**{k: v for k, v in kw.items() if k in fields})


def plot_history(history: list[dict[str, float]], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [("loss", "loss"), ("rewards/margin", "reward margin"), ("rewards/accuracy", "steer accuracy (batch)")]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, (k, title) in zip(axes, keys):
        pts = [(h["step"], h[k]) for h in history if k in h]
        if pts:
            ax.plot(*zip(*pts), marker=".", lw=1)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def memory_check(trainer: SteerTrainer, tasks: Sequence[TaskExample]) -> dict[str, Any]:
    """Estimate the peak memory of a step (`train.memory`), print it, and raise
    `train.memory.MemoryRefused` when it cannot fit (unless ``--ignore-memory-check``).

    The micro-batch is ``--token-budget`` tokens, or the longest sequence when one is longer
    (it gets a row of its own)."""
    from train.memory import MemoryRefused, estimate_memory, suggest

    cfg = trainer.steer_config
    longest = max((len(s) for t in tasks for s in Batch([t], use_sft=trainer.use_sft,
                                                        use_pairs=trainer.use_pairs).sequences), default=0)
    model = trainer.accelerator.unwrap_model(trainer.model)
    kw = dict(kl=cfg.kl_weight > 0 and cfg.kl_mode == "full", packing=cfg.packing,
              gradient_checkpointing=cfg.gradient_checkpointing)
    est = estimate_memory(model, tokens=max(cfg.token_budget, longest), device=trainer.args.device, **kw)
    bad = torch.tensor([0.0 if est.fits else 1.0], device=trainer.args.device)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)  # all ranks refuse, or none
    if trainer.is_world_process_zero():
        print(est.summary(), flush=True)
    if bad.item() > 0:
        if cfg.memory_check:
            tips = suggest(model, est, **kw) if not est.fits else []
            raise MemoryRefused(f"this run will not fit: {est.summary()}"
                                + (". Try " + "; or ".join(tips) if tips else " (on another rank)")
                                + ". --ignore-memory-check runs anyway.")
        log.warning("the estimate exceeds the free memory; running anyway (--ignore-memory-check)")
    return {"peak_bytes": est.peak, "tokens": est.tokens, "weights": est.weights,
            "trainable_state": est.trainable_state, "activations": est.activations, "transient": est.transient,
            "available": est.available, "device": est.device}


def run_training(cfg: TrainConfig, *, allow_model_mismatch: bool = False) -> dict[str, Any]:
    """The whole ``steer-train`` run: data -> model -> (check vs llama.cpp) -> LoRA -> train ->
    eval -> outputs.

    Returns the metrics dict that is also written to ``<out>/metrics.json``. A GGUF model is
    first compared with llama.cpp (``train.check.pretraining_check``): ModelMismatch unless
    ``allow_model_mismatch``."""
    import json
    import os
    import time
    from pathlib import Path

    from transformers import set_seed
    from transformers.trainer_utils import get_last_checkpoint

    from train import data as D
    from train.evaluate import evaluate_tasks
    from train.export import export_lora_gguf, merge_and_save
    from train.modeling import load_model, resolve_model, source_metadata, tokenizer_vocab_sha256

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    t0 = time.time()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    set_seed(cfg.seed)
    rep = D.load_trees(cfg.data)
    source = resolve_model(cfg.model, D.tree_models(rep.trees))
    model, tokenizer, where = load_model(source, dtype=weights_dtype(cfg), trust_remote_code=cfg.trust_remote_code)
    model_check = None
    if source.kind == "gguf" and _is_main():
        from train.check import pretraining_check

        model_check = pretraining_check(model, source.path, source_metadata(where),
                                        allow_mismatch=allow_model_mismatch).to_dict()
    vocab = D.VocabCheck(tokenizer=tokenizer, model_sha256=source.sha256,
                         vocab_sha256=tokenizer_vocab_sha256(tokenizer) if tokenizer else None)
    opts = D.DataOptions(model_token_weight=cfg.model_token_weight, accepted_weight=cfg.accepted_weight,
                         chosen_continuation=cfg.chosen_continuation, rejected_tokens=cfg.rejected_tokens,
                         max_length=cfg.max_length)
    ds = D.build_dataset(trees=rep.trees, opts=opts, vocab=vocab, eval_fraction=cfg.eval_fraction, seed=cfg.seed,
                         objective=cfg.objective)
    ds.errors, ds.files = rep.errors, rep.files
    log.info("data: %s", ds.summary())

    attn = set_attn_impl(model, cfg.attn_impl)
    model = build_peft_model(model, cfg)
    args = training_arguments(cfg, out)
    trainer = SteerTrainer(model=model, args=args, train_dataset=TaskDataset(ds.train), steer_config=cfg,
                           callbacks=[StopOnNonFinite()])
    trainer.prepare_reference(ds.train)
    memory = memory_check(trainer, ds.train)
    eval_tasks = ds.eval
    before_scores = None
    resume = None
    if cfg.resume:
        resume = get_last_checkpoint(args.output_dir) if os.path.isdir(args.output_dir) else None
        if resume is None:
            log.warning("--resume: no checkpoint in %s; starting fresh", args.output_dir)
    t_train = time.time()
    result = trainer.train(resume_from_checkpoint=resume)
    train_s = time.time() - t_train
    evaluation = evaluate_tasks(trainer.model, eval_tasks, beta=cfg.beta, packing=cfg.packing,
                                token_budget=cfg.token_budget, reference_scores=before_scores) if eval_tasks else None
    meta = source_metadata(where) if source.kind == "gguf" else {}
    metrics: dict[str, Any] = {
        "model": {"source": source.path, "kind": source.kind, "sha256": source.sha256, "loaded_from": str(where),
                  "check": model_check},
        "data": ds.summary(),
        "bad_files": ds.errors,
        "config": cfg.to_dict(),
        "attn_implementation": attn,
        "memory_estimate": memory,
        "train": {"global_step": trainer.state.global_step, "world_size": trainer.args.world_size, "train_loss": float(result.training_loss),
                  "seconds": round(train_s, 2), "steps_per_second": round(trainer.state.global_step / max(train_s, 1e-9), 4)},
        "history": trainer.history,
        "eval": evaluation,
        "eval_tasks": [t.task for t in eval_tasks],
    }
    if trainer.is_world_process_zero():
        unwrapped = trainer.accelerator.unwrap_model(trainer.model)
        unwrapped.save_pretrained(out, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(out / "tokenizer")
        if cfg.export_gguf:
            try:
                export_lora_gguf(unwrapped, out / "adapter.gguf", arch=meta.get("architecture"))
                metrics["adapter_gguf"] = str(out / "adapter.gguf")
                if source.kind == "gguf":  # Ollama: FROM the base GGUF, ADAPTER ours
                    from train.modelfile import write_modelfile

                    metrics["modelfile"] = str(write_modelfile(out, source.path, out / "adapter.gguf"))
            except Exception as exc:  # the PEFT adapter is still useful
                log.error("adapter.gguf export failed: %s", exc)
                metrics["adapter_gguf_error"] = str(exc)
        if cfg.merge:
            metrics["merged"] = str(merge_and_save(unwrapped, tokenizer, out / "merged"))
        plot_history(trainer.history, out / "training.png")
        metrics["seconds"] = round(time.time() - t0, 2)
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics
