"""Train a LoRA adapter on exported steers with TRL's ``DPOTrainer``: what a user who exports
their pairs (``steer-tui export --format dpo``) would otherwise run. `bench/loop_compare.py`
calls it for the side-by-side table; it also runs alone::

    python bench/trl_dpo.py --data pairs.jsonl --model HF_DIR --out DIR [--lr 5e-5] [--epochs 1]

``HF_DIR`` is what ``steer-train convert MODEL.gguf --out HF_DIR`` writes (TRL cannot start
from a GGUF). The LoRA matches steer-train's defaults (rank 16, alpha 16, dropout 0.05, every
attention and MLP projection) and the DPO loss is TRL's sigmoid loss with the same beta (0.1).

One change from TRL's text path, and why: TRL 1.x appends EOS to every ``chosen`` and
``rejected`` text (it assumes whole responses) and re-tokenizes ``prompt + chosen``. A steer's
correction is the middle of a response, so that would teach the model to stop after each
correction, and re-tokenizing across the cut can merge tokens. The rows carry the exact token
ids (``prompt_token_ids`` / ``chosen_token_ids`` / ``rejected_token_ids``), so this script hands
TRL those ids as its ``prompt_ids`` / ``chosen_ids`` / ``rejected_ids`` columns; TRL's
collator, loss and reference (the adapter disabled) are its own.

Writes the PEFT adapter to ``--out`` and ``--out/trl_metrics.json`` (wall time of the
training epoch(s), steps, pairs, TRL version).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path


def load_pairs(path: Path) -> list[dict]:
    rows = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        r = json.loads(line)
        for k in ("prompt_token_ids", "chosen_token_ids", "rejected_token_ids"):
            if not r.get(k):
                raise SystemExit(f"bench/trl_dpo.py: {path}:{i}: row has no {k} (export with steer-tui export --format dpo)")
        rows.append({"prompt_ids": r["prompt_token_ids"], "chosen_ids": r["chosen_token_ids"],
                     "rejected_ids": r["rejected_token_ids"]})
    if not rows:
        raise SystemExit(f"bench/trl_dpo.py: {path}: no pairs")
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, required=True, help="JSONL from steer-tui export --format dpo")
    p.add_argument("--model", type=Path, required=True, help="HF directory (steer-train convert)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--batch-size", type=int, default=4, help="pairs per step")
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-steps", type=int, default=-1)
    ns = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import torch

    try:
        import trl
    except ImportError:
        raise SystemExit("bench/trl_dpo.py: TRL is not installed; the bench extra has it: "
                         "pip install -e '.[bench]' (or pip install 'trl>=1.16,<2')") from None
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    class IdsDPOTrainer(DPOTrainer):
        """TRL's DPOTrainer on rows that are already token ids (see the module docstring)."""

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset

    rows = load_pairs(ns.data)
    tok = AutoTokenizer.from_pretrained(ns.model)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(ns.model, dtype=torch.float32)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    lora = LoraConfig(r=ns.lora_r, lora_alpha=float(ns.lora_r), lora_dropout=0.05, target_modules=targets,
                      bias="none", task_type="CAUSAL_LM")
    cfg = DPOConfig(output_dir=str(ns.out / "trl_run"), learning_rate=ns.lr, num_train_epochs=ns.epochs,
                    max_steps=ns.max_steps, per_device_train_batch_size=ns.batch_size, beta=ns.beta,
                    lr_scheduler_type="cosine", warmup_steps=0.1, logging_steps=10, save_strategy="no",
                    report_to=[], seed=ns.seed, max_length=None, use_cpu=not torch.cuda.is_available(),
                    bf16=False, remove_unused_columns=False, disable_tqdm=True)
    trainer = IdsDPOTrainer(model=model, args=cfg, train_dataset=Dataset.from_list(rows), processing_class=tok,
                            peft_config=lora)
    t0 = time.time()
    result = trainer.train()
    seconds = time.time() - t0
    trainer.model.save_pretrained(ns.out, safe_serialization=True)
    metrics = {"seconds": round(seconds, 2), "global_step": trainer.state.global_step, "pairs": len(rows),
               "epochs": ns.epochs, "lr": ns.lr, "beta": ns.beta, "batch_size": ns.batch_size,
               "train_loss": float(result.training_loss), "trl": trl.__version__,
               "history": [h for h in trainer.state.log_history if "loss" in h]}
    (ns.out / "trl_metrics.json").write_text(json.dumps(metrics, indent=1))
    print(json.dumps({k: v for k, v in metrics.items() if k != "history"}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
