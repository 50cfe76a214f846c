"""Training-step throughput and peak memory of steer-train on the bundled SmolLM2-135M.

Runs each configuration in its own subprocess (so peak memory is per configuration) on the
same synthetic steer trees (real token ids from the model's tokenizer), and prints them side
by side with ratios. CPU by default; ``--device cuda`` on a GPU (the device is printed).

    python bench/train_step.py                     # tree vs none packing, sft+dpo, CPU
    python bench/train_step.py --steps 5 --tasks 4 --steers 6 --objective dpo
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WORDS = ("apple banana cherry mango grape lemon melon peach pear plum kiwi orange red green blue sweet sour "
         "ripe fresh juicy fruit tree garden summer market basket the a and is are with of").split()


def make_tasks(tokenizer, n_tasks: int, n_steers: int, seed: int = 0):
    from steer_tui.core.tree import Node, new_tree
    from train.data import DataOptions, build_task

    rng = random.Random(seed)

    def ids(n_words: int) -> tuple[list[int], str]:
        text = "".join(" " + rng.choice(WORDS) for _ in range(n_words))
        return tokenizer(text, add_special_tokens=False)["input_ids"], text

    tasks = []
    for k in range(n_tasks):
        ptext = f"<|im_start|>user\nWrite about fruit number {k}.<|im_end|>\n<|im_start|>assistant\n"
        t = new_tree(task_id=f"bench{k}", title="bench", model={"name": "bench", "sha256": "bench", "eos_ids": [2]},
                     prompt={"mode": "raw", "text": ptext, "tokens": tokenizer(ptext, add_special_tokens=False)["input_ids"]},
                     sampling={})
        parent = None
        for _ in range(n_steers):
            a, at = ids(12)
            m = t.add(Node(t.new_id(), parent, "model", "generated", a, at, end="cut"))
            b, bt = ids(8)
            bad = t.add(Node(t.new_id(), m.id, "model", "generated", b, bt, end="paused"))
            c, ct = ids(5)
            h = t.add(Node(t.new_id(), m.id, "human", "correction", c, ct, replaces=bad.id))
            parent = h.id
        tail, tt = ids(10)
        t.add(Node(t.new_id(), parent, "model", "generated", tail, tt, end="length"))
        tasks.append(build_task(t, DataOptions()))
    return tasks


def worker(args) -> dict:
    import torch

    from train.config import make_config
    from train.modeling import load_model, resolve_model
    from steer_tui.core.models import default_model_path
    from train.model_setup import build_peft_model
    from train.trainer import SteerTrainer, TaskDataset, training_arguments

    torch.manual_seed(0)
    dev = torch.device(args.device)
    model, tok, _ = load_model(resolve_model(str(default_model_path())))
    tasks = make_tasks(tok, args.tasks, args.steers)
    out = Path(os.environ.get("TMPDIR", "/tmp")) / f"steer-bench-{os.getpid()}"
    cfg = make_config(data=["x"], out=str(out), objective=args.objective, packing=args.packing, progress=False,
                      gradient_checkpointing=args.gradient_checkpointing, lr=1e-4)
    model = build_peft_model(model, cfg).to(dev)
    trainer = SteerTrainer(model=model, args=training_arguments(cfg, out), train_dataset=TaskDataset(tasks),
                           steer_config=cfg)
    trainer.prepare_reference(tasks)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()
    batch = {"tasks": tasks}
    n_seq = sum(len(t.sft) + 2 * len(t.pairs) for t in tasks)
    n_tok = sum(len(s.input_ids) for t in tasks for s in t.sft) + sum(
        len(p.chosen_ids) + len(p.rejected_ids) for t in tasks for p in t.pairs)

    def step():
        loss = trainer.compute_loss(model, batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)

    step()  # warm-up
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    res = {
        "packing": args.packing,
        "device": torch.cuda.get_device_name(0) if dev.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        "steps_per_s": args.steps / dt,
        "tokens_per_s": args.steps * n_tok / dt,
        "sequences": n_seq,
        "tokens": n_tok,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    if dev.type == "cuda":
        res["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--tasks", type=int, default=2, help="tasks (trees) per step")
    ap.add_argument("--steers", type=int, default=6, help="steers per task")
    ap.add_argument("--objective", default="sft+dpo", choices=["sft", "dpo", "sft+dpo"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--packing", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(args)), flush=True)
        return
    results = []
    for packing in ("tree", "none"):
        cmd = [sys.executable, __file__, "--worker", "--packing", packing] + [
            a for a in sys.argv[1:] if a != "--worker"]
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            sys.exit(f"worker {packing} failed:\n{proc.stderr[-3000:]}")
        results.append(json.loads(line[7:]))
    tree, none = results
    print(f"steer-train step on SmolLM2-135M (LoRA r=16, {args.objective}), device: {tree['device']}")
    print(f"batch: {args.tasks} tasks x {args.steers} steers = {tree['sequences']} sequences, {tree['tokens']} tokens")
    mem = "peak_cuda_mib" if "peak_cuda_mib" in tree else "peak_rss_mib"
    print(f"{'packing':8s} {'steps/s':>9s} {'tokens/s':>10s} {mem:>14s}")
    for r in results:
        print(f"{r['packing']:8s} {r['steps_per_s']:9.3f} {r['tokens_per_s']:10.1f} {r[mem]:14.0f}")
    print(f"tree/none: speed x{tree['steps_per_s'] / none['steps_per_s']:.2f}, memory x{tree[mem] / none[mem]:.2f}")


if __name__ == "__main__":
    main()
