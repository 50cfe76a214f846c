"""bench/loop_rounds.py: the steer rate's standard error, the drop's, and nested subsets."""

from __future__ import annotations

import json
import math
import sys
import types
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import loop_rounds  # noqa: E402


def recs(pairs):
    return [{"task": f"t{i}", "steers": s, "model_tokens": t} for i, (s, t) in enumerate(pairs)]


def test_rate_se_of_a_ratio_estimator():
    # equal rates everywhere: no spread, no error
    assert loop_rounds.rate_se(recs([(2, 100), (4, 200), (1, 50)])) == pytest.approx(0.0)
    # by hand: rate R = 4/300; residuals s - R t = 3-4/3, 1-4/3, 0-4/3; var = sum r^2 / (n-1)
    r = recs([(3, 100), (1, 100), (0, 100)])
    R = 4 / 300
    res = [3 - 100 * R, 1 - 100 * R, 0 - 100 * R]
    var = sum(x * x for x in res) / 2
    assert loop_rounds.rate_se(r) == pytest.approx(1000 * math.sqrt(var * 3) / 300)
    assert loop_rounds.rate_se(recs([(3, 100)])) == 0.0  # one sample: no estimate


def test_drop_se_adds_relative_errors_in_quadrature():
    base = {"steers_per_1k_tokens": 10.0, "records": recs([(3, 100), (1, 100), (2, 100)])}
    tuned = {"steers_per_1k_tokens": 5.0, "records": recs([(1, 100), (0, 100), (2, 200)])}
    b_se, t_se = loop_rounds.rate_se(base["records"]), loop_rounds.rate_se(tuned["records"])
    want = 0.5 * math.hypot(b_se / 10.0, t_se / 5.0)
    assert loop_rounds.drop_se(base, tuned) == pytest.approx(want)
    assert loop_rounds.drop_se({**base, "steers_per_1k_tokens": 0.0}, tuned) == 0.0


def test_subsets_are_nested_and_in_capture_order(tmp_path):
    src = tmp_path / "tasks"
    src.mkdir()
    records = recs([(3, 50), (0, 50), (5, 50), (2, 50)])
    for r in records:
        (src / f"{r['task']}.json").write_text(json.dumps({"id": r["task"]}))
    got = {}
    for n in (1, 4, 9, 100):
        d = tmp_path / f"sub{n}"
        got[n] = (loop_rounds.subset(src, records, n, d), sorted(p.name for p in d.iterdir()))
    assert got[1] == (3, ["t0.json"])  # whole task files: at least n steers
    assert got[4] == (8, ["t0.json", "t1.json", "t2.json"])  # a task without steers comes as it came
    assert got[9] == (10, ["t0.json", "t1.json", "t2.json", "t3.json"])  # the whole capture
    assert got[100] == got[9]  # all there is
    for a, b in ((1, 4), (4, 9)):
        assert set(got[a][1]) <= set(got[b][1])


def test_a_round_capture_is_reused_by_the_other_mode(tmp_path):
    """Round 2 captures with adapter 1, which both --rounds-from modes train the same way:
    the second mode copies the first one's capture instead of steering for ten minutes."""
    shared = tmp_path / "round-captures" / "2-abc"
    shared.mkdir(parents=True)
    (shared / "t9.json").write_text('{"id": "t9"}')
    (shared / "capture.json").write_text(json.dumps({"steers": 7, "model_tokens": 900}))
    dst, done = tmp_path / "steers", tmp_path / "capture-2.json"
    dst.mkdir()
    (dst / "r2-stale.json").write_text("{}")  # an interrupted capture of this mode
    logged = []
    loop = types.SimpleNamespace(log=logged.append)  # no engine: steering would fail here
    got = loop_rounds.capture_with_adapter(loop, None, tmp_path / "a.gguf", 2, dst, done, shared)
    assert got == 7 and json.loads(done.read_text())["steers"] == 7
    assert sorted(p.name for p in dst.iterdir()) == ["r2-t9.json"]
    assert logged and "reused" in logged[0]


def fake_loop(tmp_path, trained):
    """The parts of bench/loop.py that run_rounds calls, without an engine or steer-train:
    ``train`` records which task files each adapter was trained on."""
    import shlex

    data = tmp_path / "capture"
    data.mkdir(exist_ok=True)
    for name in ("a", "b", "z"):
        (data / f"{name}.json").write_text(f'{{"id": "{name}"}}')
    cap = {"steers": 4, "records": [{"task": "a", "steers": 3, "model_tokens": 50},
                                    {"task": "z", "steers": 0, "model_tokens": 50},
                                    {"task": "b", "steers": 1, "model_tokens": 50}]}
    base = {"steers": 9, "model_tokens": 1000, "steers_per_1k_tokens": 9.0, "records": []}

    def train(d, tdir, args):
        trained.append((tdir.name, sorted(f.name for f in d.glob("*.json")), list(args)))
        tdir.mkdir(parents=True, exist_ok=True)
        (tdir / "adapter.gguf").write_bytes(b"GGUF")
        return {"data": {"train_steers": 4}, "train": {"seconds": 1.0}}

    return types.SimpleNamespace(
        capture=lambda st, cache, sha: (data, cap), heldout_base=lambda st, cache, sha: (None, base),
        shlex=shlex, log=lambda msg: None, train=train,
        heldout_tuned=lambda st, gguf: {"steers": 2, "model_tokens": 1000, "steers_per_1k_tokens": 2.0, "records": []},
        compare=lambda b, t, acc, target: {"steer_rate": {}, "guards": {}})


def test_a_rerun_trains_each_round_on_its_own_rounds_steers(tmp_path, monkeypatch):
    """Round 1 trains on round 1's steers only, also when the same --out already holds round 2's
    capture from an earlier run (the bug: one shared folder, so a rerun's round 1 saw round 2's
    steers and took round 2's cached adapter as adapter 1)."""
    captures = []

    def fake_capture(loop, st, adapter, k, dst, done, shared=None):
        captures.append((k, adapter.parent.name))
        (dst / f"r{k}-c.json").write_text('{"id": "c"}')
        done.write_text(json.dumps({"steers": 2}))
        return 2

    monkeypatch.setattr(loop_rounds, "capture_with_adapter", fake_capture)
    monkeypatch.setattr(loop_rounds, "plot", lambda *a, **k: None)
    monkeypatch.setattr(loop_rounds, "row", lambda label, res: label)
    monkeypatch.setattr(loop_rounds, "POINTS", None)  # no point cache: every round trains
    out = tmp_path / "out"
    for mode in ("continue", "continue"):  # the second run finds round 2's files in place
        trained = []
        ns = types.SimpleNamespace(out=out, train_args="", rounds_from=mode, target_drop=0.5)
        loop_rounds.run_rounds(fake_loop(tmp_path, trained), ns, None, tmp_path, "sha", 2)
        assert [t[:2] for t in trained] == [("adapter-1", ["a.json", "b.json", "z.json"]),  # the main run's data
                                            ("adapter-2", ["a.json", "b.json", "r2-c.json", "z.json"])]
        assert trained[1][2][-2:] == ["--init-adapter", str(out / "rounds-continue" / "adapter-1")]
    assert [k for k, _ in captures] == [2, 2]


def test_both_rounds_modes_are_plotted_once_both_ran(tmp_path):
    def rep(rates):
        rows = [{"round": k, "steer_rate": {"tuned": t, "drop_se": 0.05},
                 "guards": {"mean_tokens": {"ratio": 0.95}, "rep4": {"ratio": 1.02}}} for k, t in enumerate(rates, 1)]
        return json.dumps({"base": {"steers_per_1k_tokens": 10.0}, "rounds": rows})

    (tmp_path / "rounds.json").write_text(rep([2.0, 1.9]))
    assert loop_rounds.plot_modes(tmp_path) is None  # one mode only: nothing to compare
    (tmp_path / "rounds-continue.json").write_text(rep([2.0, 1.0]))
    png = loop_rounds.plot_modes(tmp_path)
    assert png == tmp_path / "rounds-modes.png" and png.read_bytes()[:4] == b"\x89PNG"


def test_steer_train_epoch_includes_its_reference_pass(tmp_path):
    """The epoch column compares steer-train with TRL, whose reference forwards run inside its
    steps: steer-train's one-time reference pass before its steps counts too."""
    (tmp_path / "metrics.json").write_text(json.dumps({"train": {"seconds": 221.93, "reference_seconds": 58.79}}))
    assert loop_rounds.epoch_seconds(tmp_path, 1.0) == pytest.approx(280.72)
    assert loop_rounds.epoch_seconds(tmp_path / "gone", 222.0) == 222.0  # no metrics: the point's own figure
