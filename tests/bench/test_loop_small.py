"""The loop benchmark, small: bench/loop.py --quick runs capture -> steer-train ->
held-out steer rate (base vs adapter.gguf in llama.cpp) -> guards, and writes its table.
Plus the guard arithmetic, checked by hand."""

from __future__ import annotations

import json

import pytest

from tests.bench import load_bench


def _loop():
    return load_bench("loop")


def test_repeated_ngram_rate_by_hand():
    loop = _loop()
    assert loop.repeated_ngram_rate([1, 2, 3]) == 0.0  # no 4-gram at all
    assert loop.repeated_ngram_rate([1, 2, 3, 4, 5, 6]) == 0.0
    # "1 2 3 4" x3: 9 four-grams, the first 4 are new, the other 5 repeat one
    assert loop.repeated_ngram_rate([1, 2, 3, 4] * 3) == pytest.approx(5 / 9)
    assert loop.repeated_ngram_rate([7] * 10) == pytest.approx(6 / 7)


def test_mean_and_standard_error_by_hand():
    loop = _loop()
    assert loop.mean_se([]) == (0.0, 0.0)
    assert loop.mean_se([3.0]) == (3.0, 0.0)
    m, se = loop.mean_se([1.0, 2.0, 3.0, 4.0])
    # sample variance 5/3, se = sqrt(5/3 / 4)
    assert m == 2.5 and se == pytest.approx((5 / 3 / 4) ** 0.5)


def test_answer_length_counts_where_the_model_ended_it():
    loop = _loop()
    assert loop.answer_length(90, "eos", 160) == 90
    assert loop.answer_length(170, "eos", 160) == 160  # rewrites grew it past the budget: capped
    assert loop.answer_length(168, "length", 160) == 160  # the budget cut it, not the model
    assert loop.answer_length(150, "length", 160) == 160  # rolled back more than rewrites wrote
    assert loop.answer_length(40, "gave-up", 160) == 160  # the rules gave up, the model had not ended


def test_the_length_guard_is_not_fooled_by_rewrite_steers():
    """Rewrite steers swap ~10 cut tokens for ~20 rule-written ones the budget does not count,
    so a budget-cut answer that needed steers holds more text than one that needed none. Two
    models that never end early have the same length; one that ends a quarter of its answers
    at 100 tokens is shorter by that much, whatever the steers did to the texts."""
    loop = _loop()

    class Words:  # a tokenizer: one token per word
        @staticmethod
        def tokenize(text):
            return text.split()

    def answers(n_words, ends):
        return [{"text": " ".join(f"w{i % 37}" for i in range(n)), "end": e} for n, e in zip(n_words, ends)]

    steered = answers([176, 168, 172, 160], ["length"] * 4)  # the base model: rewrites grew each
    clean = answers([160] * 4, ["length"] * 4)  # an adapter no rule had to steer
    early = answers([160, 160, 160, 100], ["length"] * 3 + ["eos"])
    b = loop.answer_stats(Words, steered, 160)
    assert b["text_tokens"] == 169 and b["mean_tokens"] == 160
    assert loop.answer_stats(Words, clean, 160)["mean_tokens"] / b["mean_tokens"] == 1.0
    assert loop.answer_stats(Words, early, 160)["mean_tokens"] / b["mean_tokens"] == pytest.approx(145 / 160)


def test_a_cached_side_counted_by_an_older_bench_is_recounted():
    pytest.importorskip("llama_cpp")
    loop = _loop()
    recs = [{"text": "Red, green and blue.", "end": "eos"}, {"text": "Red " * 30, "end": "length"}]
    side = {"records": recs, "guards": {"mean_tokens": 999.0, "rep4": 0.5, "base_nll": 1.0}}
    assert loop.refresh_answer_stats(side, 24) is True
    g = side["guards"]
    from steer_tui.core.engine import open_engine

    engine = open_engine(None, n_ctx=256, n_threads=1)
    try:
        n0, n1 = (len(engine.tokenize(r["text"])) for r in recs)
    finally:
        engine.close()
    assert n0 < 24 < n1  # the EOS answer counts its own length, the budget-cut one the budget
    assert g["mean_tokens"] == (n0 + 24) / 2 and g["text_tokens"] == (n0 + n1) / 2
    assert g["base_nll"] == 1.0  # what the recount does not touch is kept
    assert loop.refresh_answer_stats(side, 24) is False  # counted now: left alone


def test_guard_bounds():
    loop = _loop()
    two_sided = loop.Guard("x", "x", 0.85, 1.15)
    assert two_sided.ok(100, 90) and two_sided.ok(100, 114)
    assert not two_sided.ok(100, 84) and not two_sided.ok(100, 116)
    worse_only = loop.Guard("r", "r", None, 1.15, slack=0.01)
    assert worse_only.ok(0.05, 0.0)  # less repetition is fine
    assert worse_only.ok(0.001, 0.009)  # within the absolute slack
    assert not worse_only.ok(0.05, 0.07)
    assert not worse_only.ok(0.0, 0.2)


def test_compare_by_hand():
    """The verdict arithmetic on made-up measurements (the quick end-to-end run below trains 2
    steps, so its base and tuned rates are often equal and cannot tell a wrong formula)."""
    loop = _loop()

    def side(steers, tokens, by_rule, mean_tokens, rep4, nll, ppl):
        return {"steers_per_1k_tokens": 1000 * steers / tokens, "steers": steers, "model_tokens": tokens,
                "by_rule": by_rule, "guards": {"mean_tokens": mean_tokens, "rep4": rep4, "base_nll": nll,
                                                "neutral_ppl": ppl, "eos_share": 0.5}}

    base = side(8, 400, {"a": 6, "b": 2}, 100.0, 0.02, 2.0, 20.0)
    tuned = side(3, 500, {"a": 3}, 110.0, 0.025, 2.1, 21.0)
    c = loop.compare(base, tuned, None, target_drop=0.5)
    sr = c["steer_rate"]
    assert sr["base"] == pytest.approx(20.0) and sr["tuned"] == pytest.approx(6.0)
    assert sr["drop"] == pytest.approx(0.7) and sr["ok"] is True  # 1 - 6/20
    assert c["per_rule"]["a"] == pytest.approx({"base": 15.0, "tuned": 6.0})
    assert c["per_rule"]["b"] == pytest.approx({"base": 5.0, "tuned": 0.0})
    assert c["guards"]["mean_tokens"]["ratio"] == pytest.approx(1.1) and c["pass"] is True
    # a tuned model that writes 30% longer answers fails its guard, and the whole comparison
    longer = side(3, 500, {"a": 3}, 130.0, 0.025, 2.1, 21.0)
    c = loop.compare(base, longer, None, target_drop=0.5)
    assert c["guards"]["mean_tokens"]["ok"] is False and c["pass"] is False
    # a drop below the target fails even with every guard fine
    c = loop.compare(base, side(6, 400, {"a": 6}, 100.0, 0.02, 2.0, 20.0), None, target_drop=0.5)
    assert sr["ok"] is True and c["steer_rate"]["drop"] == pytest.approx(0.25) and c["pass"] is False


def test_quick_loop_end_to_end(tmp_path, monkeypatch, capsys):
    pytest.importorskip("torch")
    pytest.importorskip("peft")
    pytest.importorskip("llama_cpp")
    loop = _loop()
    monkeypatch.setenv("STEER_CACHE", str(tmp_path / "steer-cache"))  # never the user's cache
    out = tmp_path / "out"
    assert loop.main(["--quick", "--out", str(out), "--threads", "2"]) == 0
    rep = json.loads((out / "loop.json").read_text())
    assert (out / "loop.png").stat().st_size > 1000
    assert rep["capture"]["steers"] > 0 and rep["train_steps"] == 2
    c = rep["comparison"]
    sr = c["steer_rate"]
    assert sr["base_tokens"] > 0 and sr["tuned_tokens"] > 0
    assert sr["base"] == pytest.approx(1000 * sr["base_steers"] / sr["base_tokens"])
    assert sr["tuned"] == pytest.approx(1000 * sr["tuned_steers"] / sr["tuned_tokens"])
    assert sr["drop"] == pytest.approx(1 - sr["tuned"] / sr["base"] if sr["base"] else 0.0)
    assert sr["ok"] == (sr["drop"] >= sr["target_drop"])
    assert set(c["guards"]) == {g.key for g in loop.GUARDS} == {"mean_tokens", "rep4", "base_nll", "neutral_ppl"}
    for g in loop.GUARDS:  # each verdict is its guard's bounds applied to the two measured values
        got = c["guards"][g.key]
        assert got["base"] > 0 or got["label"].startswith("repeated")
        assert got["ok"] is g.ok(got["base"], got["tuned"]), (g, got)
    assert c["pass"] is (sr["ok"] and all(c["guards"][g.key]["ok"] for g in loop.GUARDS))
    # the base model scoring its own held-out answers: a real, finite NLL
    assert 0 < c["guards"]["base_nll"]["base"] < 10
    assert 1 < c["guards"]["neutral_ppl"]["base"] < 1000
    assert c["steer_accuracy"]["steers"] >= 1 and 0 <= c["steer_accuracy"]["tuned"] <= 1
    for k in ("mean_tokens", "rep4"):  # the noisy guards carry their standard errors
        assert c["guards"][k]["base_se"] >= 0 and c["guards"][k]["tuned_se"] >= 0
    answers = [json.loads(line) for line in (out / "trials" / rep["name"] / "tuned_answers.jsonl").read_text().splitlines()]
    assert len(answers) == rep["tuned_heldout"]["samples"] and all("text" in a for a in answers)
    # a second run reuses the cached capture and base measurements: nothing is generated again
    # (--only stops after that stage; a miss would steer the prompts again and rewrite the summary)
    summaries = sorted(out.glob("cache/*/summary.json"))
    assert [p.parent.name.split("-")[0] for p in summaries] == ["capture", "heldout"]
    stamps = [p.stat().st_mtime_ns for p in summaries]
    capsys.readouterr()
    assert loop.main(["--quick", "--out", str(out), "--threads", "2", "--only", "capture"]) == 0
    assert loop.main(["--quick", "--out", str(out), "--threads", "2", "--only", "heldout"]) == 0
    err = capsys.readouterr().err
    assert "capture: cached in" in err and "held-out base: cached in" in err, err
    assert [p.stat().st_mtime_ns for p in summaries] == stamps
    assert sorted(out.glob("cache/*/summary.json")) == summaries
    # --compare on the same capture: steer-train and the SFT-only baseline, each trained and
    # measured once; a rerun takes both points from bench/out/points (nothing trains again)
    assert loop.main(["--quick", "--out", str(out), "--threads", "2", "--compare", "steer-train,sft"]) == 0
    cmp = json.loads((out / "compare.json").read_text())
    assert [m["method"] for m in cmp["methods"]] == ["steer-train", "sft"]
    sft_cfg = json.loads((out / "compare" / "sft" / "metrics.json").read_text())["config"]
    assert (sft_cfg["objective"], sft_cfg["kl_weight"]) == ("sft", 0.0)
    for m in cmp["methods"]:
        assert m["train_steers"] == rep["capture"]["steers"] and m["train_seconds"] > 0
        assert set(m["guards"]) == {g.key for g in loop.GUARDS}
    capsys.readouterr()
    assert loop.main(["--quick", "--out", str(out), "--threads", "2", "--compare", "steer-train,sft"]) == 0
    err = capsys.readouterr().err
    assert err.count(": cached (") == 2 and "train: steer-train" not in err, err
    assert json.loads((out / "compare.json").read_text())["methods"] == cmp["methods"]
