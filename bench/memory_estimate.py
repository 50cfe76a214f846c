"""The memory check's estimate against the measured peak of a real training step, per config.

Each configuration runs in a fresh process (forked from one that imported torch): a small random Llama (CPU, fp32), two
synthetic steer tasks, the real `SteerTrainer`; the child computes `train.memory.estimate_memory`
exactly as ``steer-train`` does (tokens = max(--token-budget, longest sequence)), then takes one
``training_step`` + optimizer step and measures

* ``rss``: the step's peak RSS minus the RSS just before it (``VmHWM`` after resetting it
  through ``/proc/self/clear_refs``), with glibc's default malloc, i.e. what a user's run holds;
* ``live``: the same in a child started with ``MALLOC_MMAP_THRESHOLD_=65536``, which makes
  glibc map every block of 64 KiB or more on its own and unmap it when freed, so RSS follows
  the bytes of live tensors (no freed blocks kept in the heap).

and prints one table: the estimate of what is still to allocate, both measurements and
their ratio to it (> 1: the estimate was low). ``--dry-run``: two tiny configurations
(seconds), for CI.

    python bench/memory_estimate.py                      # the grid of docs/training.md
    python bench/memory_estimate.py --layers 8 --hidden 512
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

WORKER = r"""
import gc, json, os, sys, tempfile, pathlib
import torch
torch.set_num_threads(1)
from transformers import LlamaConfig, LlamaForCausalLM
from tests.train.tiny import synthetic_tree
from train.batching import Batch
from train.config import make_config
from train.data import DataOptions, build_task
from train.memory import estimate_memory
from train.model_setup import build_peft_model, set_attn_impl
from train.trainer import SteerTrainer, TaskDataset, training_arguments

def status_kb(key):
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)

def measure(c):
    out = pathlib.Path(tempfile.mkdtemp())
    torch.manual_seed(0)
    mc = LlamaConfig(vocab_size=c["vocab"], hidden_size=c["hidden"], intermediate_size=2 * c["hidden"],
                     num_hidden_layers=c["layers"], num_attention_heads=8, num_key_value_heads=4,
                     max_position_embeddings=8192, tie_word_embeddings=True)
    model = LlamaForCausalLM(mc)
    tc = make_config(data=["x"], out=str(out), objective="sft+dpo", lora_r=8, token_budget=c["budget"],
                     kl_weight=1.0, kl_mode=c["kl"], packing=c["packing"], gradient_checkpointing=c["ckpt"],
                     attn_impl=c["attn"], progress=False, batch_size=2, max_steps=1)
    set_attn_impl(model, tc.attn_impl, "cpu")
    tasks = [build_task(synthetic_tree(f"t{i}", i, n_steers=c["steers"]), DataOptions()) for i in range(2)]
    model = build_peft_model(model, tc)
    trainer = SteerTrainer(model=model, args=training_arguments(tc, out), train_dataset=TaskDataset(tasks),
                           steer_config=tc)
    trainer.prepare_reference(tasks)
    batch = Batch(tasks, use_sft=trainer.use_sft, use_pairs=trainer.use_pairs)
    longest = max(len(s) for s in batch.sequences)
    micro = len(batch.split(tc.token_budget, tc.packing))
    est = estimate_memory(model, tokens=max(c["budget"], longest), kl=tc.full_kl, packing=tc.packing,
                          gradient_checkpointing=tc.gradient_checkpointing, micro_batches=micro > 1)
    trainer.create_optimizer_and_scheduler(num_training_steps=1)
    trainer.current_gradient_accumulation_steps = 1
    gc.collect()
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # reset VmHWM to the current RSS
    before = status_kb("VmRSS")
    trainer.training_step(model, {"tasks": tasks})
    trainer.optimizer.step()
    peak = status_kb("VmHWM")
    return {"estimate": est.to_allocate, "measured": peak - before, "micro": micro,
            "activations": est.activations, "transient": est.transient, "state": est.trainable_state}

# one fork per configuration: each measures in a fresh process without importing torch again
for c in json.loads(sys.argv[1]):
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            os.write(w, json.dumps(measure(c)).encode())
        except BaseException as exc:
            os.write(w, json.dumps({"error": repr(exc)}).encode())
        os._exit(0)
    os.close(w)
    with os.fdopen(r) as fh:
        res = json.loads(fh.read())
    os.waitpid(pid, 0)
    print(json.dumps(res), flush=True)
"""


def run_children(configs: list[dict], live: bool) -> list[dict]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("MALLOC_MMAP_THRESHOLD_", None)
    if live:
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    proc = subprocess.Popen([sys.executable, "-c", WORKER, json.dumps(configs)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    rows = []
    for line in proc.stdout:  # one line per configuration, as each finishes
        if line.startswith("{"):
            rows.append(json.loads(line))
            c = configs[len(rows) - 1]
            print(f"{'live' if live else 'rss '} {c['packing']}/{c['kl']}/ckpt={c['ckpt']}/{c['budget']}: {rows[-1]}",
                  file=sys.stderr, flush=True)
    err = proc.stderr.read()
    proc.wait()
    bad = [r["error"] for r in rows if "error" in r]
    if proc.returncode != 0 or bad or len(rows) != len(configs):
        raise RuntimeError(f"measuring failed: {bad}\n{err[-3000:]}")
    return rows


def grid(args) -> list[dict]:
    base = dict(vocab=args.vocab, hidden=args.hidden, layers=args.layers, steers=args.steers, attn=args.attn)
    if args.dry_run:
        base.update(vocab=512, hidden=64, layers=2, steers=4)
        return [dict(base, packing=p, kl="full", ckpt=False, budget=64) for p in ("tree", "none")]
    out = []
    for packing, kl, ckpt, budget in itertools.product(("tree", "none"), ("full", "token"), (False, True),
                                                       args.budgets):
        out.append(dict(base, packing=packing, kl=kl, ckpt=ckpt, budget=budget))
    return out


def table(rows: list[tuple[dict, dict, dict]]) -> str:
    mib = 1 << 20
    lines = ["| packing | KL | checkpointing | --token-budget | micro-batches | estimated | measured RSS | ratio | "
             "measured live | ratio |", "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for c, rss, live in rows:
        e = rss["estimate"]
        lines.append(f"| {c['packing']} | {c['kl']} | {'on' if c['ckpt'] else 'off'} | {c['budget']} | {rss['micro']} | "
                     f"{e / mib:.1f} MiB | {rss['measured'] / mib:.1f} MiB | {rss['measured'] / e:.2f} | "
                     f"{live['measured'] / mib:.1f} MiB | {live['measured'] / e:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--steers", type=int, default=16, help="steers per task (2 tasks)")
    ap.add_argument("--attn", choices=("sdpa", "eager"), default="sdpa")
    ap.add_argument("--budgets", type=int, nargs="+", default=[128, 512])
    ap.add_argument("--dry-run", action="store_true", help="two tiny configurations (CI smoke test)")
    ap.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    args = ap.parse_args(argv)
    configs = grid(args)
    rows = list(zip(configs, run_children(configs, live=False), run_children(configs, live=True)))
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps([{"config": c, "rss": r, "live": lv} for c, r, lv in rows], indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
