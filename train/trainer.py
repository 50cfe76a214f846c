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

import logging
import math
from collections import defaultdict
from typing import Any, Sequence

import torch
from transformers import Trainer, TrainerCallback

from train.config import ConfigError, TrainConfig, parse_layers
from train.data import TaskExample
from train.losses import (chosen_nll, dpo_loss, dpo_metrics, full_reference_kl, pad_logps, reference_kl, span_logps,
                          weighted_nll)
from train.packing import token_logprobs

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
                    self.sft_idx.append(len(self.sequences))
                    self.sequences.append(s.input_ids)
                    self.sft.append(s)
                    self.keys.append((t.task, "sft", i))
            if use_pairs:
                for i, p in enumerate(t.pairs):
                    self.chosen_idx.append(len(self.sequences))
                    self.sequences.append(p.chosen_ids)
                    self.keys.append((t.task, "chosen", i))
                    self.rejected_idx.append(len(self.sequences))
                    self.sequences.append(p.rejected_ids)
                    self.keys.append((t.task, "rejected", i))
                    self.pairs.append(p)

    def kl_masks(self) -> list[list[bool]]:
        """Per sequence, which predictions the reference KL covers: the model-written
        targets of the SFT paths; nothing on the DPO sequences."""
        masks: list[list[bool]] = [[False] * (len(s) - 1) for s in self.sequences]
        for i, s in zip(self.sft_idx, self.sft):
            masks[i] = [bool(m) for m in s.model_mask[1:]]
        return masks


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
             batch_size: int = 4) -> None:
        """Compute missing reference log-probs, a few tasks per forward."""
        todo = [t for t in tasks if any(k not in self.logps for k in Batch([t], use_sft=use_sft, use_pairs=use_pairs).keys)]
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
            self.reference.fill(model, ds, self.steer_config, self.sft_reference, self.use_pairs)

    # -- loss ------------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        cfg = self.steer_config
        tasks: list[TaskExample] = inputs["tasks"]
        inner = self.accelerator.unwrap_model(model)
        fwd = inner if model is inner else _ForwardThrough(model, inner)
        batch = Batch(tasks, use_sft=self.use_sft, use_pairs=self.use_pairs)
        missing = [k for k in batch.keys if k not in self.reference and (self.sft_reference or k[1] != "sft")]
        if missing:  # examples not seen by prepare_reference (e.g. a custom dataset)
            self.reference.fill(inner, tasks, cfg, self.sft_reference, self.use_pairs)
        if not batch.sequences:
            loss = sum(p.sum() * 0.0 for p in inner.parameters() if p.requires_grad)
            return (loss, {}) if return_outputs else loss
        full_kl = cfg.kl_weight > 0 and cfg.kl_mode == "full" and bool(batch.sft_idx)
        dists = None
        if full_kl:
            masks = batch.kl_masks()
            logps, dists = token_logprobs(fwd, batch.sequences, packing=cfg.packing, token_budget=cfg.token_budget,
                                          fallback=True, dist_masks=masks)
        else:
            logps = token_logprobs(fwd, batch.sequences, packing=cfg.packing, token_budget=cfg.token_budget,
                                   fallback=True)
        device = logps[0].device
        ref = self.reference.get(batch.keys, device, sft=self.sft_reference)
        terms = self.loss_terms(batch, logps, ref, device)
        if dists is not None:
            ref_dists = self.reference_dists(inner, batch, [masks[i] for i in batch.sft_idx])
            kl = full_reference_kl([dists[i] for i in batch.sft_idx], ref_dists)
            terms["loss"] = terms["loss"] + cfg.kl_weight * kl
            terms["kl"] = kl.detach()
        loss = terms.pop("loss")
        self._check_finite(loss)
        for k, v in terms.items():
            self._metrics[k].append(float(v))
        return (loss, {}) if return_outputs else loss

    @torch.no_grad()
    def reference_dists(self, model, batch: Batch, masks: list) -> list[torch.Tensor]:
        """The base model's full log-softmax rows at the flagged positions of the SFT
        sequences (adapter disabled, eval mode, no grad): the other side of the full KL."""
        cfg = self.steer_config
        was_training = model.training
        model.eval()
        try:
            with _adapter_disabled(model):
                _, rows = token_logprobs(model, [batch.sequences[i] for i in batch.sft_idx], packing=cfg.packing,
                                         token_budget=cfg.token_budget, fallback=True, dist_masks=masks)
        finally:
            model.train(was_training)
        return rows

    def loss_terms(self, batch: Batch, logps: list[torch.Tensor], ref: list[torch.Tensor | None],
                   device) -> dict[str, Any]:
        """Combine the loss terms of one batch; returns ``loss`` (scalar) and float metrics."""
        cfg = self.steer_config
        out: dict[str, Any] = {}
        loss = logps[0].sum() * 0.0
        if batch.sft_idx:
            pol = pad_logps([logps[i] for i in batch.sft_idx])
            w = pad_logps([torch.tensor(s.weights[1:], dtype=torch.float32, device=device) for s in batch.sft])
            mm = pad_logps([torch.tensor(s.model_mask[1:], dtype=torch.float32, device=device) for s in batch.sft])
            if "sft" in cfg.objective and bool((w > 0).any()):
                sft = weighted_nll(pol, w, normalize="token")
                loss = loss + cfg.sft_weight * sft
                out["sft_loss"] = sft.detach()
            if cfg.kl_weight > 0 and cfg.kl_mode == "token" and bool((mm > 0).any()):
                kl = reference_kl(pol, pad_logps([ref[i] for i in batch.sft_idx]), mm)
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
            dpo = d.losses.mean()
            loss = loss + cfg.dpo_weight * dpo
            out["dpo_loss"] = dpo.detach()
            if cfg.rpo_alpha > 0:
                rpo = chosen_nll(pc * (lc if cfg.length_normalize else 1), lc).mean()
                loss = loss + cfg.rpo_alpha * rpo
                out["rpo_loss"] = rpo.detach()
            for k, v in dpo_metrics(d).items():
                out[k] = v
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
    return get_peft_model(model, lc)


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
    from train.modeling import load_model, resolve_model, source_metadata, token_pieces, vocab_sha256_from_pieces

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    t0 = time.time()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    set_seed(cfg.seed)
    rep = D.load_trees(cfg.data)
    source = resolve_model(cfg.model, D.tree_models(rep.trees))
    model, tokenizer, where = load_model(source, trust_remote_code=cfg.trust_remote_code)
    model_check = None
    if source.kind == "gguf" and _is_main():
        from train.check import pretraining_check

        model_check = pretraining_check(model, source.path, source_metadata(where),
                                        allow_mismatch=allow_model_mismatch).to_dict()
    vocab = D.VocabCheck(tokenizer=tokenizer, model_sha256=source.sha256,
                         vocab_sha256=vocab_sha256_from_pieces(token_pieces(tokenizer)) if tokenizer else None)
    opts = D.DataOptions(model_token_weight=cfg.model_token_weight, accepted_weight=cfg.accepted_weight,
                         chosen_continuation=cfg.chosen_continuation, rejected_tokens=cfg.rejected_tokens,
                         max_length=cfg.max_length)
    ds = D.build_dataset(trees=rep.trees, opts=opts, vocab=vocab, eval_fraction=cfg.eval_fraction, seed=cfg.seed,
                         objective=cfg.objective)
    ds.errors, ds.files = rep.errors, rep.files
    log.info("data: %s", ds.summary())

    model = build_peft_model(model, cfg)
    args = training_arguments(cfg, out)
    trainer = SteerTrainer(model=model, args=args, train_dataset=TaskDataset(ds.train), steer_config=cfg,
                           callbacks=[StopOnNonFinite()])
    trainer.prepare_reference(ds.train)
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
            except Exception as exc:  # the PEFT adapter is still useful
                log.error("adapter.gguf export failed: %s", exc)
                metrics["adapter_gguf_error"] = str(exc)
        if cfg.merge:
            metrics["merged"] = str(merge_and_save(unwrapped, tokenizer, out / "merged"))
        plot_history(trainer.history, out / "training.png")
        metrics["seconds"] = round(time.time() - t0, 2)
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics
