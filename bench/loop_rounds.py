"""Rounds and the data-efficiency curve of the steer loop (``bench/loop.py --rounds N``,
``--curve 30,60,120,240``).

* **curve**: from the one cached capture, adapters trained on nested subsets of its steers
  (whole task files in capture order until at least N steers), each measured on the
  held-out prompts like the main run: the drop in steers per 1,000 tokens with its standard
  error, and every guard. One adapter per point, trained from the base model.
* **rounds**: round 1 is the main run's capture; round k captures new samples (other seeds)
  with base + adapter(k-1) steering, as a user keeps steering the improved model, and
  adapter k is trained *from the base model* on all steers so far. Each round is measured
  on the held-out prompts: the cumulative drop against the base model and the guards.

Writes ``curve.json``/``curve.png`` and ``rounds.json``/``rounds.png`` next to ``loop.json``.
The per-sample steer rate's standard error gives the ``+-`` of each drop (the base and the
tuned rates are independent samples: their errors add in quadrature, relative).
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path
from types import ModuleType
from typing import Any


def rate_se(records: list[dict]) -> float:
    """Standard error of the steer rate (per 1k tokens) over samples (a ratio estimator:
    the per-sample rates' spread, weighted by tokens)."""
    toks = [r["model_tokens"] for r in records if r["model_tokens"]]
    if len(toks) < 2:
        return 0.0
    total_s = sum(r["steers"] for r in records)
    total_t = sum(toks)
    rate = total_s / total_t
    resid = [r["steers"] - rate * r["model_tokens"] for r in records if r["model_tokens"]]
    n = len(resid)
    var = sum(x * x for x in resid) / (n - 1)
    return 1000.0 * math.sqrt(var * n) / total_t


def drop_se(base: dict, tuned: dict) -> float:
    """Standard error of 1 - tuned/base from the two rates' standard errors."""
    b, t = base["steers_per_1k_tokens"], tuned["steers_per_1k_tokens"]
    if not b or not t:
        return 0.0
    rel = math.hypot(rate_se(base["records"]) / b, rate_se(tuned["records"]) / t)
    return (t / b) * rel


def subset(tasks_dir: Path, records: list[dict], n_steers: int, dst: Path) -> int:
    """Copy the capture's task files, in capture order, into ``dst`` until they hold at least
    ``n_steers`` steers (nested: a larger N starts with the same files). Returns the steers.
    Tasks without a steer are copied too, as they come: the whole capture is then the main
    run's data file for file (one cached point), and objectives that train on text without a
    steer (``sft+dpo``) see it (``dpo`` skips those tasks)."""
    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    got = 0
    for r in records:
        if got >= n_steers:
            break
        src = tasks_dir / f"{r['task']}.json"
        if src.is_file():
            shutil.copy2(src, dst / src.name)
            got += r["steers"]
    return got


def data_key(data: Path, train_args: list[str], st: Any) -> str:
    """What a trained and measured point depends on: the steer files (names and sizes), the
    steer-train flags and the held-out settings."""
    import hashlib

    files = sorted((f.name, f.stat().st_size) for f in data.glob("*.json"))
    return hashlib.sha256(json.dumps([files, train_args, repr(st)], default=str).encode()).hexdigest()[:16]


def point(loop: ModuleType, st: Any, base: dict, data: Path, tdir: Path, train_args: list[str], target: float) -> dict:
    """Train an adapter on ``data`` and measure it on the held-out prompts. The result is kept
    in ``tdir/point.json`` (with every tuned answer) and reused when nothing it depends on
    changed, so ``--curve``, ``--rounds`` and ``--compare`` share points."""
    key = data_key(data, train_args, st)
    old = cached_point(key, loop, st)
    if old is not None:
        loop.log(f"point {tdir.name}: cached ({key})")
        adapter_dir = Path(old.get("adapter_dir", tdir))
        seconds = epoch_seconds(adapter_dir, old["train_seconds"])
        return finish_point(loop, base, old["tuned"], old["train_steers"], seconds, adapter_dir, key, target)
    metrics = loop.train(data, tdir, train_args)
    gguf = tdir / "adapter.gguf"
    if not gguf.is_file():
        raise SystemExit(f"bench/loop.py: steer-train wrote no {gguf} ({metrics.get('adapter_gguf_error')})")
    tuned = loop.heldout_tuned(st, gguf)
    return finish_point(loop, base, tuned, metrics["data"]["train_steers"], epoch_seconds(tdir, 0.0), tdir, key,
                        target)


def epoch_seconds(adapter_dir: Path, fallback: float) -> float:
    """What one epoch of steer-train cost: its steps plus the one-time reference pass before
    them (part of an epoch's cost, as TRL's per-step reference forwards are part of its own),
    from the run's metrics.json; ``fallback`` when that file is gone."""
    f = adapter_dir / "metrics.json"
    if not f.is_file():
        return fallback
    t = json.loads(f.read_text())["train"]
    return round(t["seconds"] + t.get("reference_seconds", 0.0), 2)


POINTS: Path | None = None  # bench/out/points: every measured point by key (set by loop.main)


def cached_point(key: str, loop: ModuleType | None = None, st: Any = None) -> dict | None:
    """The point measured before under ``key``, or None. With ``loop``, its answers' length and
    repetition are recounted if an older bench/loop.py counted them (``refresh_answer_stats``)."""
    f = POINTS / f"{key}.json" if POINTS is not None else None
    if f is None or not f.is_file():
        return None
    old = json.loads(f.read_text())
    if loop is not None:
        loop.refresh_answer_stats(old["tuned"], st.max_tokens)
    return old


def finish_point(loop: ModuleType, base: dict, tuned: dict, steers: int, seconds: float, tdir: Path, key: str,
                 target: float) -> dict:
    res = loop.compare(base, tuned, None, target)
    res["steer_rate"]["drop_se"] = drop_se(base, tuned)
    res["train_steers"] = steers
    res["train_seconds"] = seconds
    res["adapter_dir"] = str(tdir)  # where adapter.gguf is (a cached point: where it was trained)
    res["key"] = key
    blob = json.dumps({"key": key, "tuned": tuned, "train_steers": steers, "train_seconds": seconds,
                       "adapter_dir": str(tdir)})
    tdir.mkdir(parents=True, exist_ok=True)
    (tdir / "point.json").write_text(blob)
    if POINTS is not None:
        POINTS.mkdir(parents=True, exist_ok=True)
        (POINTS / f"{key}.json").write_text(blob)
    return res


def row(label: str, res: dict) -> str:
    sr, g = res["steer_rate"], res["guards"]
    cells = [f"{label:>10}", f"{res.get('train_steers', 0):>6}", f"{sr['tuned']:7.2f}",
             f"{-sr['drop']:+6.0%} +-{sr['drop_se']:4.0%}"]
    for k in ("mean_tokens", "rep4", "base_nll", "neutral_ppl"):
        r = g[k]["ratio"]
        cells.append(f"{r:6.2f}{'' if g[k]['ok'] else '!'}" if r is not None else "     -")
    return "  ".join(cells)


HEADER = (f"{'':>10}  {'steers':>6}  {'/1k tok':>7}  {'change':>12}  {'length':>6}  {'rep-4':>6}  "
          f"{'NLL':>6}  {'ppl':>6}   (guards: tuned/base, ! = outside its bound)")


def run_curve(loop: ModuleType, ns: Any, st: Any, cache: Path, model_sha: str, points: list[int]) -> dict:
    data, cap = loop.capture(st, cache, model_sha)
    _, base = loop.heldout_base(st, cache, model_sha)
    train_args = loop.shlex.split(ns.train_args)
    rows = []
    for n in sorted(points):
        sub = ns.out / "curve" / f"data-{n}"
        got = subset(data, cap["records"], n, sub)
        loop.log(f"curve: {n} steers asked, {got} in the subset")
        res = point(loop, st, base, sub, ns.out / "curve" / f"adapter-{n}", train_args, ns.target_drop)
        res["asked"] = n
        rows.append(res)
    report = {"base": {k: v for k, v in base.items() if k != "records"}, "points": rows,
              "train_args": train_args, "capture_steers": cap["steers"]}
    (ns.out / "curve.json").write_text(json.dumps(report, indent=1))
    print(f"data-efficiency curve: base {base['steers_per_1k_tokens']:.2f} steers/1k held-out tokens "
          f"(+- {rate_se(base['records']):.2f})")
    print(HEADER)
    for r in rows:
        print(row(f"{r['asked']}", r))
    plot(ns.out / "curve.png", [r["train_steers"] for r in rows], rows, "training steers",
         f"held-out drop vs training steers (one capture, nested subsets; {' '.join(train_args) or 'defaults'})")
    return report


def run_rounds(loop: ModuleType, ns: Any, st: Any, cache: Path, model_sha: str, n_rounds: int) -> dict:
    data, cap = loop.capture(st, cache, model_sha)
    _, base = loop.heldout_base(st, cache, model_sha)
    train_args = loop.shlex.split(ns.train_args)
    mode = getattr(ns, "rounds_from", "base")
    rdir = ns.out / ("rounds" if mode == "base" else f"rounds-{mode}")
    subset(data, cap["records"], 10**9, rdir / "captured" / "1")  # round 1: the whole capture, afresh each run
    (rdir / "capture-1.json").write_text(json.dumps({"data": str(data), "steers": cap["steers"]}))
    rows, captured = [], [cap["steers"]]
    adapter: Path | None = None
    for k in range(1, n_rounds + 1):
        if k > 1:
            t0 = time.time()
            shared = ns.out / "round-captures" / f"{k}-{rows[-1]['key']}"  # by adapter k-1: round 2 is the same in both modes
            own = rdir / "captured" / str(k)
            own.mkdir(parents=True, exist_ok=True)
            got = capture_with_adapter(loop, st, adapter, k, own, rdir / f"capture-{k}.json", shared)
            captured.append(got)
            loop.log(f"round {k}: captured {got} steers with adapter {k - 1} in {time.time() - t0:.0f}s")
        all_steers = round_data(rdir, k)
        args_k = train_args
        if mode == "continue" and adapter is not None:
            args_k = [*train_args, "--init-adapter", str(adapter.parent)]
        res = point(loop, st, base, all_steers, rdir / f"adapter-{k}", args_k, ns.target_drop)
        res["round"], res["captured"] = k, captured[-1]
        rows.append(res)
        adapter = Path(res["adapter_dir"]) / "adapter.gguf"
    how = ("base (adapter k is trained from the base model on all steers of rounds 1..k)" if mode == "base" else
           "continue (adapter k goes on training adapter k-1, on all steers of rounds 1..k)")
    report = {"base": {k: v for k, v in base.items() if k != "records"}, "rounds": rows, "train_args": train_args,
              "from": how}
    (rdir.parent / f"{rdir.name}.json").write_text(json.dumps(report, indent=1))
    print(f"rounds ({mode}): base {base['steers_per_1k_tokens']:.2f} steers/1k held-out tokens; "
          "drop is cumulative vs base")
    print(HEADER)
    for r in rows:
        print(row(f"round {r['round']}", r))
    plot(rdir.parent / f"{rdir.name}.png", [r["round"] for r in rows], rows, "round",
         f"held-out steer rate per round (adapter k: {how.split(' (')[0]} + all steers of rounds 1..k)", base=base)
    plot_modes(ns.out)
    return report


MODES = (("rounds", "from the base model"), ("rounds-continue", "continuing adapter k-1"))


def plot_modes(out: Path) -> Path | None:
    """``rounds-modes.png``: both ``--rounds-from`` modes on one plot, once both were run in
    ``out`` (the steer rate per round with its standard error; length and repeated 4-grams)."""
    runs = [(json.loads((out / f"{name}.json").read_text()), label) for name, label in MODES
            if (out / f"{name}.json").is_file()]
    if len(runs) < 2:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4))
    b = runs[0][0]["base"]["steers_per_1k_tokens"]
    for (rep, label), style in zip(runs, ("o-", "s--")):
        ks = [r["round"] for r in rep["rounds"]]
        a1.errorbar([0, *ks], [b, *(r["steer_rate"]["tuned"] for r in rep["rounds"])],
                    yerr=[0.0, *(b * r["steer_rate"]["drop_se"] for r in rep["rounds"])], fmt=style, capsize=3,
                    label=label)
        for key, name in (("mean_tokens", "length"), ("rep4", "repeated 4-grams")):
            a2.plot(ks, [r["guards"][key]["ratio"] or 1.0 for r in rep["rounds"]], style, label=f"{name}, {label}")
        a1.set_xticks([0, *ks])
        a2.set_xticks(ks)
    a1.axhline(b * 0.15, color="gray", ls=":", lw=0.8, label="-85%")
    a1.set_xlabel("round")
    a1.set_ylabel("held-out steers per 1,000 tokens (+- s.e.)")
    a1.legend(fontsize=8)
    a1.grid(alpha=0.3)
    for v in (0.9, 1.1):
        a2.axhline(v, color="gray", ls="--", lw=0.8)
    a2.set_xlabel("round")
    a2.set_ylabel("tuned / base")
    a2.set_title("guards (dashed: +-10%)")
    a2.legend(fontsize=8)
    a2.grid(alpha=0.3)
    fig.suptitle("rounds: adapter k trained from the base model vs continuing adapter k-1 (all steers of rounds 1..k)",
                 fontsize=10)
    fig.tight_layout()
    path = out / "rounds-modes.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def round_data(rdir: Path, k: int) -> Path:
    """Adapter k's training data: the task files of rounds 1..k (``rdir/captured/j``), copied
    afresh into ``rdir/steers-k``. Each round has its own folder, so a rerun in the same
    ``--out`` trains round 1 on round 1's steers even when later rounds were captured before."""
    dst = rdir / f"steers-{k}"
    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    for j in range(1, k + 1):
        for f in sorted((rdir / "captured" / str(j)).glob("*.json")):
            shutil.copy2(f, dst / f.name)
    return dst


def capture_with_adapter(loop: ModuleType, st: Any, adapter: Path, k: int, dst: Path, done: Path,
                         shared: Path | None = None) -> int:
    """Round k's capture: the training prompts again with other seeds, steered by the rules
    on base + the previous adapter; its task files join ``dst`` (once: ``done`` records it).
    ``shared`` (a folder named by adapter k-1's point) keeps a copy, so the other
    ``--rounds-from`` mode reuses it when its adapter k-1 is the same one."""
    import dataclasses
    import tempfile

    if done.is_file() and any(dst.glob(f"r{k}-*.json")):
        return json.loads(done.read_text())["steers"]
    for stale in dst.glob(f"r{k}-*.json"):  # an interrupted capture: start over
        stale.unlink()
    if shared is not None and (shared / "capture.json").is_file():
        for f in shared.glob("*.json"):
            if f.name != "capture.json":
                shutil.copy2(f, dst / f"r{k}-{f.name}")
        shutil.copy2(shared / "capture.json", done)
        loop.log(f"round {k}: capture reused from {shared}")
        return json.loads(done.read_text())["steers"]

    tasks = loop.load_tasks(st.train_prompts)
    engine = loop.open_engine(None, n_ctx=st.n_ctx, n_threads=st.threads, adapter=adapter)
    st_k = dataclasses.replace(st, seed=st.seed + 7919 * k)
    try:
        with tempfile.TemporaryDirectory(prefix=f"steer-round{k}-") as tmp:
            res = loop.steer_run(engine, tasks, st_k, loop.Store(tmp), st.samples, max_steers=st.max_steers)
            if shared is not None:
                shutil.rmtree(shared, ignore_errors=True)
                shared.mkdir(parents=True)
            for f in (Path(tmp) / "tasks").glob("*.json"):
                shutil.copy2(f, dst / f"r{k}-{f.name}")
                if shared is not None:
                    shutil.copy2(f, shared / f.name)
    finally:
        engine.close()
    done.write_text(json.dumps({"steers": res["steers"], "model_tokens": res["model_tokens"]}))
    if shared is not None:  # written last: a folder without it is an interrupted copy
        shutil.copy2(done, shared / "capture.json")
    return res["steers"]


def plot(path: Path, xs: list, rows: list[dict], xlabel: str, title: str, base: dict | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4))
    rates = [r["steer_rate"]["tuned"] for r in rows]
    drops = [100 * r["steer_rate"]["drop"] for r in rows]
    errs = [100 * r["steer_rate"]["drop_se"] for r in rows]
    if base is not None:  # rounds: the steer rate itself, base at round 0
        a1.plot([0, *xs], [base["steers_per_1k_tokens"], *rates], "o-")
        a1.set_ylabel("held-out steers per 1,000 tokens")
        a1.set_xticks([0, *xs])
    else:
        a1.errorbar(xs, drops, yerr=errs, fmt="o-", capsize=3)
        a1.set_ylabel("held-out drop in steers / 1k tokens (%)")
    a1.set_xlabel(xlabel)
    a1.grid(alpha=0.3)
    for key, label in (("mean_tokens", "length"), ("rep4", "repeated 4-grams"), ("base_nll", "base NLL"),
                       ("neutral_ppl", "neutral ppl")):
        a2.plot(xs, [r["guards"][key]["ratio"] or 1.0 for r in rows], "o-", label=label)
    a2.axhline(1.0, color="k", lw=0.8)
    for v in (0.9, 1.1):
        a2.axhline(v, color="gray", ls="--", lw=0.8)
    a2.set_xticks(xs)
    a2.set_xlabel(xlabel)
    a2.set_ylabel("tuned / base")
    a2.set_title("guards (dashed: +-10%)")
    a2.legend(fontsize=8)
    a2.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
