"""One whole ``steer-train`` run, as ``train.cli`` starts it: trees -> model -> (check against
llama.cpp) -> LoRA -> memory check -> train -> held-out evaluation -> outputs in ``--out``
(the PEFT adapter, adapter.gguf, a Modelfile, metrics.json, training.png).

The pieces live elsewhere (`train.data`, `train.modeling`, `train.model_setup`,
`train.trainer`, `train.memory`, `train.evaluate`, `train.export`); this module only puts
them in order and records what happened.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Sequence

from transformers import set_seed

from train import data as D
from train.batching import Batch, forwarded_tokens
from train.config import TrainConfig
from train.data import TaskExample
from train.distributed import ShardedForward, describe, gathered_lora_state
from train.evaluate import evaluate_tasks
from train.export import ExportError, export_lora_gguf, merge_and_save
from train.memory import check_memory
from train.model_setup import build_peft_model, set_attn_impl, weights_dtype
from train.modeling import load_model, resolve_model, source_metadata, tokenizer_vocab_sha256
from train.quant import compute_dtype
from train.retokenize import VocabCheck
from train.trainer import StopOnNonFinite, SteerTrainer, TaskDataset, last_checkpoint, training_arguments

log = logging.getLogger(__name__)


def is_main_process() -> bool:
    """Whether this process is rank 0 of a ``torchrun``/``accelerate launch`` run (or runs alone)."""
    return int(os.environ.get("RANK", "0")) == 0


def _memory_check(trainer, tasks: Sequence[TaskExample]) -> dict[str, Any]:
    """`train.memory.check_memory` for this run (raises `train.memory.MemoryRefused` unless
    ``--ignore-memory-check``); returns the estimate for metrics.json.

    The micro-batch is ``--token-budget`` tokens, or the longest sequence when one is longer
    (it gets a row of its own)."""
    cfg = trainer.steer_config
    kw = dict(use_sft=trainer.use_sft, use_pairs=trainer.use_pairs)
    longest = max((len(s) for t in tasks for s in Batch([t], **kw).sequences), default=0)
    # can a step run in several micro-batches? (the largest tasks in one batch)
    size = {id(t): forwarded_tokens(Batch([t], **kw).sequences, cfg.packing, cfg.token_budget) for t in tasks}
    biggest = sorted(tasks, key=lambda t: size[id(t)], reverse=True)[:cfg.batch_size]
    several = len(Batch(biggest, **kw).split(cfg.token_budget, cfg.packing)) > 1 if biggest else False
    est = check_memory(trainer.accelerator.unwrap_model(trainer.model), tokens=max(cfg.token_budget, longest),
                       kl=cfg.full_kl, packing=cfg.packing, gradient_checkpointing=cfg.gradient_checkpointing,
                       device=trainer.args.device, force=not cfg.memory_check,
                       report=trainer.is_world_process_zero(), micro_batches=several)
    return est.metrics()


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
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    t0 = time.time()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    set_seed(cfg.seed)
    rep = D.load_trees(cfg.data)
    source = resolve_model(cfg.model, D.tree_models(rep.trees))
    dtype = compute_dtype(cfg) if cfg.load_in_4bit else weights_dtype(cfg)
    model, tokenizer, where = load_model(source, dtype=dtype, trust_remote_code=cfg.trust_remote_code,
                                         load_in_4bit=cfg.load_in_4bit)
    model_check = None
    if source.kind == "gguf" and is_main_process() and cfg.load_in_4bit:
        # NF4 moves the base model's log-probs by far more than the check's threshold, so
        # comparing it with llama.cpp would say nothing about the conversion
        model_check = {"skipped": "--load-in-4bit: the check compares a full-precision model with llama.cpp; "
                                  f"run `steer-train check-model {source.path}`"}
        log.warning("model check skipped under --load-in-4bit; `steer-train check-model %s` checks the conversion",
                    source.path)
    elif source.kind == "gguf" and is_main_process():
        from train.check import pretraining_check

        model_check = pretraining_check(model, source.path, source_metadata(where),
                                        allow_mismatch=allow_model_mismatch).to_dict()
    vocab = VocabCheck(tokenizer=tokenizer, model_sha256=source.sha256,
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
    t_ref = time.time()
    trainer.prepare_reference(ds.train)  # once, before the steps (part of what an epoch costs)
    reference_s = time.time() - t_ref
    memory = _memory_check(trainer, ds.train)
    eval_tasks = ds.eval
    resume = None
    if cfg.resume:
        resume = last_checkpoint(args.output_dir)
        if resume is None:
            log.warning("--resume: no checkpoint in %s; starting fresh", args.output_dir)
    t_train = time.time()
    result = trainer.train(resume_from_checkpoint=resume)
    train_s = time.time() - t_train
    scorer = trainer.scoring_model()  # every rank scores every held-out task (FSDP: in step)
    evaluation = evaluate_tasks(scorer, eval_tasks, beta=cfg.beta, packing=cfg.packing,
                                token_budget=cfg.token_budget) if eval_tasks else None
    if isinstance(scorer, ShardedForward):
        scorer.pad()
    lora = gathered_lora_state(trainer)  # FSDP/ZeRO-3: a collective, every rank; else None
    meta = source_metadata(where) if source.kind == "gguf" else {}
    metrics: dict[str, Any] = {
        "model": {"source": source.path, "kind": source.kind, "sha256": source.sha256, "loaded_from": str(where),
                  "check": model_check, "weights": "nf4" if cfg.load_in_4bit else ("bfloat16" if dtype is not None else "float32")},
        "data": ds.summary(),
        "bad_files": ds.errors,
        "config": cfg.to_dict(),
        "attn_implementation": attn,
        "memory_estimate": memory,
        "train": {"global_step": trainer.state.global_step, "world_size": trainer.args.world_size, "train_loss": float(result.training_loss),
                  "seconds": round(train_s, 2), "reference_seconds": round(reference_s, 2),
                  "steps_per_second": round(trainer.state.global_step / max(train_s, 1e-9), 4),
                  **describe(trainer.accelerator)},
        "history": trainer.history,
        "eval": evaluation,
        "eval_tasks": [t.task for t in eval_tasks],
    }
    if trainer.is_world_process_zero():
        unwrapped = trainer.accelerator.unwrap_model(trainer.model)
        # sharded: the gathered LoRA, not this rank's shards of it
        unwrapped.save_pretrained(out, safe_serialization=True, **({"state_dict": lora} if lora is not None else {}))
        if tokenizer is not None:
            tokenizer.save_pretrained(out / "tokenizer")
        if cfg.export_gguf:
            try:
                export_lora_gguf(unwrapped, out / "adapter.gguf", arch=meta.get("architecture"), state=lora)
                metrics["adapter_gguf"] = str(out / "adapter.gguf")
                if source.kind == "gguf":  # Ollama: FROM the base GGUF, ADAPTER ours
                    from train.modelfile import write_modelfile

                    metrics["modelfile"] = str(write_modelfile(out, source.path, out / "adapter.gguf"))
            except (ExportError, OSError, ValueError) as exc:  # the PEFT adapter is still useful
                log.error("adapter.gguf export failed: %s", exc)
                metrics["adapter_gguf_error"] = str(exc)
        if cfg.merge and lora is not None:  # this rank holds shards of the base weights only
            log.error("--merge: not under FSDP/ZeRO-3 (the base weights are sharded); merge the saved adapter "
                      "in a single process")
            metrics["merged_error"] = "not under FSDP/ZeRO-3"
        elif cfg.merge:
            metrics["merged"] = str(merge_and_save(unwrapped, tokenizer, out / "merged"))
        plot_history(trainer.history, out / "training.png")
        metrics["seconds"] = round(time.time() - t0, 2)
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics
