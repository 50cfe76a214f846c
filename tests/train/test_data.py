"""Trees -> SFT sequences and DPO pairs, by token ids, on a hand-built tree."""

from __future__ import annotations

import json

import pytest

from steer_tui.core.store import save_tree
from steer_tui.core.tree import Node, new_tree
from train.data import IGNORE_INDEX, DataError, DataOptions, build_dataset, build_task, split_by_task
from train.retokenize import VocabCheck, retokenize_segments

EOS = 0
PROMPT = [1, 2, 3]


def model(tree, parent, tokens, end="paused", text=None):
    return tree.add(Node(tree.new_id(), parent, "model", "generated", list(tokens), text or f"m{tokens}",
                         logprobs=[-1.0] * len(tokens), end=end))


def human(tree, parent, tokens, replaces, kind="correction"):
    return tree.add(Node(tree.new_id(), parent, "human", kind, list(tokens), f"h{tokens}", replaces=replaces))


def build_tree(task_id="t1"):
    """n1 [10..13] | n2 [14,15] (split tail, rejected) -> n10 [16,17]
                   | n3 human [20,21] replaces n2 -> n4 [30,31] | n5 [32,33] (rejected)
                                                               | n6 pick [40] replaces n5 -> n7 [50,51,EOS] eos
                   | n8 human [60] replaces n2 (discarded) -> n9 [61]"""
    t = new_tree(task_id=task_id, title="hand", model={"name": "toy", "path": "", "sha256": "x", "n_vocab": 100,
                                                       "vocab_sha256": "v", "eos_ids": [EOS]},
                 prompt={"mode": "raw", "text": "p", "tokens": PROMPT}, sampling={})
    n1 = model(t, None, [10, 11, 12, 13, 14, 15])
    n2 = t.split(n1.id, 4, "head", "tail")
    n10 = model(t, n2.id, [16, 17])
    n3 = human(t, n1.id, [20, 21], n2.id)
    n4 = model(t, n3.id, [30, 31, 32, 33])
    n5 = t.split(n4.id, 2, "a", "b")
    n6 = human(t, n4.id, [40], n5.id, kind="pick")
    n7 = model(t, n6.id, [50, 51, EOS], end="eos")
    n8 = human(t, n1.id, [60], n2.id)
    n9 = model(t, n8.id, [61])
    t.discarded.append(n8.id)
    ids = dict(n1=n1, n2=n2, n3=n3, n4=n4, n5=n5, n6=n6, n7=n7, n8=n8, n9=n9, n10=n10)
    return t, {k: v.id for k, v in ids.items()}


def test_sft_weights_human_spans_only_by_default():
    t, ids = build_tree()
    ex = build_task(t, DataOptions())
    assert [s.leaf for s in ex.sft] == [ids["n7"]]  # rejected branches and the discarded one are not paths
    s = ex.sft[0]
    assert s.input_ids == PROMPT + [10, 11, 12, 13, 20, 21, 30, 31, 40, 50, 51, EOS]  # EOS kept once, not added
    assert s.weights == [0, 0, 0, 0, 0, 0, 0, 1, 1, 0, 0, 1, 0, 0, 0]
    assert s.labels == [IGNORE_INDEX] * 7 + [20, 21] + [IGNORE_INDEX] * 2 + [40] + [IGNORE_INDEX] * 3
    assert s.model_mask == [0, 0, 0, 1, 1, 1, 1, 0, 0, 1, 1, 0, 1, 1, 1]


def test_sft_model_and_accepted_weights():
    t, ids = build_tree()
    s = build_task(t, DataOptions(model_token_weight=0.25)).sft[0]
    assert s.weights[3:] == [0.25] * 4 + [1, 1, 0.25, 0.25, 1, 0.25, 0.25, 0.25]
    t.accepted.append(ids["n7"])
    s = build_task(t, DataOptions(model_token_weight=0.0, accepted_weight=0.5)).sft[0]
    assert s.weights[3:] == [0.5] * 4 + [1, 1, 0.5, 0.5, 1, 0.5, 0.5, 0.5]


def test_eos_appended_only_when_the_path_ended_with_eos():
    t, ids = build_tree()
    t.node(ids["n7"]).tokens = [50, 51]  # engine recorded eos without its token
    assert build_task(t, DataOptions()).sft[0].input_ids[-3:] == [50, 51, EOS]
    t.node(ids["n7"]).end = "length"
    assert build_task(t, DataOptions()).sft[0].input_ids[-2:] == [50, 51]


def test_shared_nodes_weighted_once_across_paths():
    t, ids = build_tree()
    human(t, ids["n4"], [41, 42], ids["n5"])  # a second correction at the same branch point
    ex = build_task(t, DataOptions())
    assert len(ex.sft) == 2
    first, second = ex.sft
    # n3 (human [20, 21]) is on both paths but trained once
    assert sum(first.weights) == 3 and sum(second.weights) == 2
    assert second.input_ids[-2:] == [41, 42]


def test_dpo_pairs_split_replaced_node_and_pick():
    t, ids = build_tree()
    ex = build_task(t, DataOptions())
    by = {p.steer: p for p in ex.pairs}
    assert set(by) == {ids["n3"], ids["n6"]}  # n8 is discarded
    p = by[ids["n3"]]
    assert p.prefix == PROMPT + [10, 11, 12, 13]  # cut mid-node: prefix ends at the split
    assert (p.chosen, p.rejected) == ([20, 21], [14, 15])  # K = len(chosen)
    assert p.chosen_ids == PROMPT + [10, 11, 12, 13, 20, 21]
    assert p.chosen_span == (6, 8) and p.rejected_span == (6, 8)
    q = by[ids["n6"]]
    assert q.kind == "pick"
    assert q.prefix == PROMPT + [10, 11, 12, 13, 20, 21, 30, 31]
    assert (q.chosen, q.rejected) == ([40], [32])


def test_dpo_rejected_k_extends_into_child_and_chosen_continuation():
    t, ids = build_tree()
    ex = build_task(t, DataOptions(rejected_tokens=5, chosen_continuation=2))
    by = {p.steer: p for p in ex.pairs}
    # n2 [14, 15] then its first model child n10 [16, 17]; the branch ends, so 4 < 5 tokens
    assert by[ids["n3"]].rejected == [14, 15, 16, 17]
    assert by[ids["n3"]].chosen == [20, 21, 30, 31]  # + 2 model tokens on the chosen branch
    assert by[ids["n6"]].chosen == [40, 50, 51]
    assert by[ids["n6"]].rejected == [32, 33]  # n5 split tail, nothing after it


def test_max_length_drops_longer_sequences_sft_and_pairs_alike():
    """One limit: an SFT path (15 tokens here) or a pair (prefix + its longer side: 9 and 12)
    longer than ``max_length`` is dropped; one exactly as long is kept."""
    t, ids = build_tree()
    ex = build_task(t, DataOptions(max_length=15))
    assert len(ex.sft) == 1 and {p.steer for p in ex.pairs} == {ids["n3"], ids["n6"]}
    ex = build_task(t, DataOptions(max_length=14))
    assert ex.sft == [] and {p.steer for p in ex.pairs} == {ids["n3"], ids["n6"]}
    ex = build_task(t, DataOptions(max_length=11))
    assert ex.sft == [] and {p.steer for p in ex.pairs} == {ids["n3"]}
    assert len(build_task(t, DataOptions(max_length=None)).sft) == 1


def test_pair_without_signal_is_dropped():
    t, ids = build_tree()
    human(t, ids["n4"], [32], ids["n5"], kind="pick")  # picked the token the model had written
    assert {p.steer for p in build_task(t, DataOptions()).pairs} == {ids["n3"], ids["n6"]}


def test_shared_lead_moves_into_the_prefix():
    """A rewrite that retypes the start of what it replaces ([14, 22] for [14, 15]): both
    spans start at the first divergent token, and the shared token joins the prefix."""
    t, ids = build_tree()
    h = human(t, ids["n1"], [14, 22, 23], ids["n2"])
    p = {q.steer: q for q in build_task(t, DataOptions(rejected_tokens=4)).pairs}[h.id]
    assert p.prefix == PROMPT + [10, 11, 12, 13, 14]
    assert (p.chosen, p.rejected) == ([22, 23], [15, 16, 17])
    assert p.chosen_ids == PROMPT + [10, 11, 12, 13, 14, 22, 23]  # the sequences themselves are unchanged
    assert p.rejected_ids == PROMPT + [10, 11, 12, 13, 14, 15, 16, 17]
    assert p.chosen_span == (7, 9)


def test_split_by_task_is_seeded_and_disjoint():
    items = [type("E", (), {"task": f"t{i}"})() for i in range(10)]
    tr, ev = split_by_task(items, 0.2, seed=1)
    assert len(ev) == 2 and not {e.task for e in tr} & {e.task for e in ev}
    tr2, ev2 = split_by_task(list(reversed(items)), 0.2, seed=1)
    assert [e.task for e in ev2] == [e.task for e in ev]
    # the seed matters: seed 2 holds out another pair (sha256 order: seed 1 -> t4, t1; seed 2 -> t4, t6)
    assert sorted(e.task for e in ev) == ["t1", "t4"]
    assert sorted(e.task for e in split_by_task(items, 0.2, seed=2)[1]) == ["t4", "t6"]
    assert sorted(e.task for e in tr + ev) == sorted(e.task for e in items)  # nothing lost or doubled
    assert split_by_task(items[:1], 0.5, seed=0)[1] == []  # one task: nothing held out
    with pytest.raises(DataError, match="eval-fraction"):
        split_by_task(items, 1.0, seed=0)


def test_build_dataset_reports_bad_files_and_stops_without_steers(tmp_path):
    for i in range(3):
        save_tree(build_tree(f"task{i}")[0], tmp_path / "tasks" / f"task{i}.json")
    (tmp_path / "tasks" / "broken.json").write_text("{not json")
    bad = build_tree("bad")[0].to_dict()
    bad["nodes"][0]["parent"] = "nope"
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    ds = build_dataset([tmp_path], eval_fraction=0.34, seed=0)
    assert len(ds.errors) == 2 and any("broken.json" in e for e in ds.errors)
    assert len(ds.train) == 2 and len(ds.eval) == 1
    assert ds.summary()["train_steers"] == 4
    empty = tmp_path / "empty"
    empty.mkdir()
    t = build_tree("nosteer")[0]
    t.nodes = [n for n in t.nodes if n.id == "n1"]
    t.discarded = []
    t._reindex()
    save_tree(t, empty / "x.json")
    with pytest.raises(DataError, match="no steers"):
        build_dataset([empty], objective="dpo")
    with pytest.raises(DataError, match="does not exist"):
        build_dataset([tmp_path / "missing"])


@pytest.fixture(scope="module")
def smol_tokenizer(model_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_path.parent), gguf_file=model_path.name)


@pytest.mark.parametrize(
    "texts",
    [
        ["<|im_start|>user\nName a fruit<|im_end|>\n<|im_start|>assistant\n", " Straw", "berries are red"],
        ["The cat sat on the mat", "tress", " and", " slept. ", "Ünïcödé ✓ 🍓", "x"],
        ["a", "b", "c", "", "defg"],
    ],
)
def test_retokenized_spans_are_exact(smol_tokenizer, texts):
    parts = retokenize_segments(smol_tokenizer, texts)
    assert len(parts) == len(texts)
    for ids, text in zip(parts, texts):
        assert smol_tokenizer.decode(ids) == text


def test_mismatched_vocab_retokenizes_each_span(smol_tokenizer, caplog):
    t, ids = build_tree()
    texts = {"n1": "Fruits: Straw", "n2": "berry", "n3": "berries", "n4": " are", "n5": " red",
             "n6": " sweet", "n7": ".", "n8": "x", "n9": "y", "n10": "z"}
    for k, v in texts.items():
        t.node(ids[k]).text = v
    t.prompt["text"] = "<|im_start|>user\nhi<|im_end|>\n"
    vc = VocabCheck(tokenizer=smol_tokenizer, model_sha256="other", vocab_sha256="other")
    with caplog.at_level("WARNING"):
        ex = build_task(t, DataOptions(), vc)
        build_task(t, DataOptions(), vc)
    assert ex.retokenized and sum("re-tokenizing" in r.message for r in caplog.records) == 1
    s = ex.sft[0]
    human_text = smol_tokenizer.decode([tok for tok, w in zip(s.input_ids, s.weights) if w == 1])
    assert human_text == "berries sweet"
    # the path ended with eos: the training tokenizer's own EOS closes it
    expect = t.prompt["text"] + "Fruits: Strawberries are sweet." + smol_tokenizer.eos_token
    assert smol_tokenizer.decode(s.input_ids) == expect
    by = {p.steer: p for p in ex.pairs}
    p = by[ids["n3"]]
    assert smol_tokenizer.decode(p.prefix) == t.prompt["text"] + "Fruits: Straw"
    assert smol_tokenizer.decode(p.chosen) == "berries"
    assert smol_tokenizer.decode(p.rejected).startswith("berry")
    # the same vocabulary (by hash) uses the stored ids untouched
    same = VocabCheck(tokenizer=smol_tokenizer, vocab_sha256="v")
    assert not build_task(t, DataOptions(), same).retokenized


def test_split_keeps_copies_of_one_task_together():
    items = [type("E", (), {"task": f"t{i}.{j}" if j else f"t{i}", "group": f"t{i}"})() for i in range(6) for j in range(2)]
    for seed in range(5):
        tr, ev = split_by_task(items, 0.34, seed=seed)
        assert ev and tr
        assert not {e.group for e in tr} & {e.group for e in ev}
