"""Wall time of one training epoch on the same steers, same CPU, side by side: steer-train
(its defaults: tree packing, reference states kept) and TRL's ``DPOTrainer`` on the same
steers exported as DPO pairs (`bench/trl_dpo.py`: LoRA r16 on the same projections, 4 pairs
per step), what issue #14's "epoch >= 3x faster" target compares.

Each side trains ``--steps`` optimizer steps; its epoch is extrapolated from the mean step
time (steer-train: 2 trees per step, plus its one-time reference pass over the data; TRL:
4 pairs per step, its reference runs inside every step). The two alternate ``--repeats``
times, so a machine that slows down slows both::

    python bench/epoch_time.py --threads 2            # the rewrite capture of bench/loop.py
    python bench/epoch_time.py --data TREES_DIR --steps 6 --repeats 1

Needs the ``bench`` extra (TRL). Writes ``bench/out/epoch_time/epoch_time.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import loop  # noqa: E402
from loop_compare import converted_base, export_pairs  # noqa: E402


def default_data() -> Path | None:
    found = sorted((ROOT / "bench" / "out" / "rewrite" / "cache").glob("capture-*/store/tasks"))
    return found[-1] if found else None


def steer_train(data: Path, out: Path, steps: int) -> dict:
    loop.run_python(["-m", "train", "--data", str(data), "--out", str(out), "--eval-fraction", "0", "--no-progress",
                     "-q", "--no-gguf", "--max-steps", str(steps)], "steer-train")
    m = json.loads((out / "metrics.json").read_text())
    tr, cfg = m["train"], m["config"]
    per_step = tr["seconds"] / tr["global_step"]
    epoch_steps = math.ceil(m["data"]["train_tasks"] / cfg["batch_size"])
    return {"steps": tr["global_step"], "step_s": per_step, "once_s": tr.get("reference_seconds", 0.0),
            "epoch_steps": epoch_steps, "epoch_s": tr.get("reference_seconds", 0.0) + per_step * epoch_steps}


def trl(pairs: Path, hf: Path, out: Path, steps: int) -> dict:
    loop.run_python(["bench/trl_dpo.py", "--data", str(pairs), "--model", str(hf), "--out", str(out),
                     "--max-steps", str(steps)], "TRL DPOTrainer")
    m = json.loads((out / "trl_metrics.json").read_text())
    per_step = m["seconds"] / m["global_step"]
    epoch_steps = math.ceil(m["pairs"] / m["batch_size"])
    return {"steps": m["global_step"], "step_s": per_step, "once_s": 0.0, "epoch_steps": epoch_steps,
            "epoch_s": per_step * epoch_steps}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=None, help="steer trees (default: bench/loop.py's rewrite capture)")
    p.add_argument("--steps", type=int, default=10, help="optimizer steps per run")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="torch threads of both")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "epoch_time")
    ns = p.parse_args(argv)
    data = ns.data or default_data()
    if data is None or not data.is_dir():
        p.error(f"--data: no steer trees at {data} (run bench/loop.py --rules bench/loop_data/rewrite_rules.toml "
                "--out bench/out/rewrite first, or name a directory)")
    loop.THREADS = ns.threads
    ns.out.mkdir(parents=True, exist_ok=True)
    pairs = ns.out / "pairs.jsonl"
    n_pairs = export_pairs(loop, data, pairs)
    cache = data.parents[2] if len(data.parents) > 2 and (data.parents[2] / "hf-base" / "config.json").is_file() else ns.out
    hf = converted_base(loop, cache)  # the rewrite bench's converted base when it has one
    runs = []
    for r in range(ns.repeats):
        st = steer_train(data, ns.out / f"steer-train-{r}", ns.steps)
        loop.log(f"repeat {r}: steer-train {st['step_s']:.1f} s/step -> epoch {st['epoch_s']:.0f} s")
        tr = trl(pairs, hf, ns.out / f"trl-{r}", ns.steps)
        loop.log(f"repeat {r}: TRL {tr['step_s']:.1f} s/step -> epoch {tr['epoch_s']:.0f} s")
        runs.append({"steer-train": st, "trl": tr, "ratio": tr["epoch_s"] / st["epoch_s"]})
    print(f"{n_pairs} pairs from {data}; {ns.steps} steps per run, threads {ns.threads or 'default'}")
    print("| repeat | steer-train s/step | steps/epoch | one-time s | epoch s | TRL s/step | steps/epoch | epoch s "
          "| TRL / steer-train |")
    print("|---|---|---|---|---|---|---|---|---|")
    for i, r in enumerate(runs):
        a, b = r["steer-train"], r["trl"]
        print(f"| {i} | {a['step_s']:.2f} | {a['epoch_steps']} | {a['once_s']:.0f} | {a['epoch_s']:.0f} "
              f"| {b['step_s']:.2f} | {b['epoch_steps']} | {b['epoch_s']:.0f} | {r['ratio']:.2f}x |")
    ratios = [r["ratio"] for r in runs]
    print(f"TRL's epoch / steer-train's: {min(ratios):.2f}x - {max(ratios):.2f}x (target >= 3x)")
    (ns.out / "epoch_time.json").write_text(json.dumps({"data": str(data), "pairs": n_pairs, "steps": ns.steps,
                                                        "threads": ns.threads, "runs": runs}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
