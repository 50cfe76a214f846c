"""steer-train side by side with what a user would otherwise run (``bench/loop.py --compare``).

On the one cached capture and the same held-out measurement as the main run:

* ``steer-train``: its defaults (plus ``--train-args``);
* ``sft``: an SFT-only baseline, the chosen spans only (``--objective sft --kl-weight 0``:
  the human correction tokens carry the loss, nothing else does);
* ``trl:LR``: the steers exported with ``steer-tui export --format dpo``, trained with TRL's
  ``DPOTrainer`` (LoRA of the same rank on the same base, ``bench/trl_dpo.py``) at learning
  rate LR, its adapter exported to GGUF with ``steer-train export-gguf``.

Every adapter is measured by the same held-out steer rate and guards; the table adds each
trainer's wall time for one epoch over the same steers on this CPU. Writes
``compare.json``/``compare.png`` next to ``loop.json``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import loop_rounds
from loop_rounds import HEADER, data_key, finish_point, point, row

SFT_ARGS = ["--objective", "sft", "--kl-weight", "0"]


def converted_base(loop: ModuleType, cache: Path) -> Path:
    """``steer-train convert`` of the bundled GGUF (once, into the bench cache)."""
    from steer_tui.core.models import default_model_path

    out = cache / "hf-base"
    if not (out / "config.json").is_file():
        loop.run_python(["-m", "train", "convert", str(default_model_path()), "--out", str(out), "--force"],
                        "steer-train convert")
    return out


def export_pairs(loop: ModuleType, data: Path, dst: Path) -> int:
    loop.run_python(["-m", "steer_tui.cli", "export", "--from", str(data), "--format", "dpo", "--out", str(dst)],
                    "steer-tui export --format dpo")
    return sum(1 for line in dst.read_text().splitlines() if line.strip())


def trl_point(loop: ModuleType, st: Any, base: dict, data: Path, cache: Path, tdir: Path, lr: float,
              target: float, epochs: float) -> dict:
    key = data_key(data, ["trl", lr, epochs], st)
    old = loop_rounds.cached_point(key, loop, st)
    if old is not None:
        loop.log(f"point {tdir.name}: cached ({key})")
        return finish_point(loop, base, old["tuned"], old["train_steers"], old["train_seconds"], tdir, key, target)
    tdir.mkdir(parents=True, exist_ok=True)
    gguf, done = tdir / "adapter.gguf", tdir / "trained.json"
    if done.is_file() and gguf.is_file() and json.loads(done.read_text()).get("key") == key:
        m = json.loads((tdir / "peft" / "trl_metrics.json").read_text())  # trained, not yet measured
        n = m["pairs"]
        loop.log(f"trl: trained before ({m['global_step']} steps, epoch {m['seconds']:.0f}s); measuring")
    else:
        hf = converted_base(loop, cache)
        pairs = tdir / "pairs.jsonl"
        n = export_pairs(loop, data, pairs)
        loop.log(f"trl: {n} pairs, lr {lr}, {epochs} epoch(s)")
        t0 = time.time()
        loop.run_python(["bench/trl_dpo.py", "--data", str(pairs), "--model", str(hf), "--out", str(tdir / "peft"),
                         "--lr", str(lr), "--epochs", str(epochs)], "TRL DPOTrainer")
        m = json.loads((tdir / "peft" / "trl_metrics.json").read_text())
        loop.log(f"trl: {m['global_step']} steps, epoch {m['seconds']:.0f}s (whole run {time.time() - t0:.0f}s)")
        from steer_tui.core.models import default_model_path

        loop.run_python(["-m", "train", "export-gguf", str(tdir / "peft"), "--model", str(default_model_path()),
                         "--out", str(gguf)], "steer-train export-gguf")
        done.write_text(json.dumps({"key": key}))
    tuned = loop.heldout_tuned(st, gguf)
    return finish_point(loop, base, tuned, n, m["seconds"] / max(epochs, 1e-9), tdir, key, target)


def run_compare(loop: ModuleType, ns: Any, st: Any, cache: Path, model_sha: str, methods: list[str]) -> dict:
    data, cap = loop.capture(st, cache, model_sha)
    _, base = loop.heldout_base(st, cache, model_sha)
    train_args = loop.shlex.split(ns.train_args)
    out = ns.out / "compare"
    rows = []
    for m in methods:
        if m == "steer-train":
            res = point(loop, st, base, data, out / "steer-train", train_args, ns.target_drop)
        elif m == "sft":
            res = point(loop, st, base, data, out / "sft", [*train_args, *SFT_ARGS], ns.target_drop)
        elif m.startswith("trl:"):
            lr = float(m.split(":", 1)[1])
            res = trl_point(loop, st, base, data, cache, out / f"trl-{lr:g}", lr, ns.target_drop, 1.0)
        else:
            raise SystemExit(f"bench/loop.py: --compare: unknown method {m!r} (steer-train, sft, trl:LR)")
        res["method"] = m
        rows.append(res)
    report = {"base": {k: v for k, v in base.items() if k != "records"}, "methods": rows, "train_args": train_args,
              "capture_steers": cap["steers"]}
    ns.out.mkdir(parents=True, exist_ok=True)
    (ns.out / "compare.json").write_text(json.dumps(report, indent=1))
    print(f"side by side on {cap['steers']} captured steers: base {base['steers_per_1k_tokens']:.2f} steers/1k "
          f"held-out tokens (+- {loop_rounds.rate_se(base['records']):.2f}); epoch = wall seconds of one epoch "
          "(steer-train's: its steps + its one-time reference pass)")
    print(HEADER + "   epoch s")
    for r in rows:
        print(row(r["method"][:10], r) + f"   {r['train_seconds']:7.0f}")
    plot(ns.out / "compare.png", rows, cap["steers"])
    return report


def plot(path: Path, rows: list[dict], steers: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4))
    names = [r["method"] for r in rows]
    a1.bar(names, [100 * r["steer_rate"]["drop"] for r in rows],
           yerr=[100 * r["steer_rate"]["drop_se"] for r in rows], capsize=3,
           color=["tab:green" if r["pass"] else "tab:red" for r in rows])
    a1.set_ylabel("held-out drop in steers / 1k tokens (%)")
    a1.set_title("drop (green: every guard within bounds)")
    a1.grid(axis="y", alpha=0.3)
    a2.bar(names, [r["train_seconds"] for r in rows])
    a2.set_ylabel("seconds per epoch (this CPU)")
    a2.grid(axis="y", alpha=0.3)
    fig.suptitle(f"same {steers} steers: steer-train vs SFT-only vs TRL DPOTrainer", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
