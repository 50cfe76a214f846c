"""Hostile and broken input: each is one clear error naming the file/argument and what is
wrong (CLI: exit code 2, no traceback), never a crash, never silent damage."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest

from steer_tui.core.fake_engine import FakeEngine
from steer_tui.core.session import Session
from steer_tui.core.session_errors import ModelMismatch, ModelMismatchWarning, SessionError
from steer_tui.core.store import Store, StoreError, load_tree
from steer_tui.core.tree import TreeError

from .conftest import assert_user_error, build_session, run_cli


def _write(tmp_path: Path, name: str, data) -> Path:
    p = tmp_path / name
    if isinstance(data, bytes):
        p.write_bytes(data)
    elif isinstance(data, str):
        p.write_text(data, encoding="utf-8")
    else:
        p.write_text(json.dumps(data), encoding="utf-8")
    return p


# ------------------------------------------------------------------ broken files


def _broken_files(tmp_path: Path, valid: dict) -> list[tuple[str, Path, list[str]]]:
    good = json.dumps(valid).encode()
    cases: list[tuple[str, object, list[str]]] = [
        ("truncated", good[: len(good) // 2], ["not valid JSON"]),
        ("garbage", os.urandom(4096).replace(b"{", b"x"), []),
        ("empty", b"", ["empty"]),
        ("whitespace", b"  \n\t ", ["empty"]),
        ("nul-bytes", b"\0" * 1000, ["not valid JSON"]),
        ("latin1", '{"title": "caf\xe9"}'.encode("latin-1"), ["not UTF-8"]),
        ("bom", b"\xef\xbb\xbf" + good, ["not valid JSON", "BOM"]),  # refused, and the BOM named
        ("deep-nesting", b"[" * 200_000 + b"]" * 200_000, []),
        ("json-array", b"[1, 2, 3]", ["expected a JSON object"]),
        ("json-string", b'"steer-tree"', ["expected a JSON object"]),
        ("wrong-format", {**valid, "format": "something-else"}, ["format"]),
        ("no-format", {k: v for k, v in valid.items() if k != "format"}, ["format"]),
        ("version-2", {**valid, "version": 2}, ["version 2 is newer", "upgrade steer"]),
        ("version-0", {**valid, "version": 0}, ["version 0"]),
        ("version-str", {**valid, "version": "1"}, ["version"]),
        ("nodes-not-list", {**valid, "nodes": {"n1": {}}}, ["nodes"]),
        ("model-not-dict", {**valid, "model": "smollm"}, ["model"]),
    ]
    out = []
    for name, data, needles in cases:
        out.append((name, _write(tmp_path, f"{name}.json", data), needles))
    return out


def test_broken_files_are_clear_errors_via_cli(tmp_path, valid_tree_dict):
    for name, path, needles in _broken_files(tmp_path, valid_tree_dict):
        with pytest.raises((StoreError, TreeError)) as ei:
            load_tree(path)
        assert str(path) in str(ei.value), name
        for n in needles:
            assert n in str(ei.value), (name, str(ei.value))
    # the CLI: one line, exit 2, no traceback, for a sample (each CLI call is a fresh interpreter)
    files = {name: (path, needles) for name, path, needles in _broken_files(tmp_path, valid_tree_dict)}
    for name in ("truncated", "bom", "deep-nesting", "version-2"):
        path, needles = files[name]
        proc = run_cli("show", str(path))
        assert_user_error(proc, str(path), *needles)
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_bom_file_is_refused_naming_the_file_and_the_bom(tmp_path, valid_tree_dict):
    """The writer never puts a BOM in a task file; one in front of valid JSON is refused
    with the file and the BOM named (not silently read, not a traceback)."""
    p = _write(tmp_path, "bom.json", b"\xef\xbb\xbf" + json.dumps(valid_tree_dict).encode())
    proc = run_cli("show", str(p))
    assert_user_error(proc, str(p), "BOM")
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_huge_sparse_file_is_refused_quickly(tmp_path):
    p = tmp_path / "huge.json"
    with open(p, "wb") as fh:  # 100 MB, sparse: instant to make, never read into memory
        fh.truncate(100 * 2**20)
    proc = run_cli("show", str(p))
    assert_user_error(proc, str(p), "100 MiB", "STEER_MAX_TREE_MB")


def test_huge_real_file_under_a_raised_limit_loads(tmp_path, valid_tree_dict):
    """100 MB of real JSON (a giant title) with the limit raised: it loads, and `show`
    prints a clipped, one-line title."""
    d = copy.deepcopy(valid_tree_dict)
    d["title"] = "A" * (100 * 2**20)
    p = tmp_path / "big.json"
    p.write_text(json.dumps(d), encoding="ascii")
    proc = run_cli("show", str(p), env={"STEER_MAX_TREE_MB": "200"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert len(proc.stdout) < 100_000


def test_list_reports_each_broken_file_and_lists_the_rest(tmp_path, valid_tree_dict):
    store = tmp_path / "store"
    with build_session(store, task_id="good-one"):
        pass
    tasks = store / "tasks"
    for name, path, _ in _broken_files(tmp_path, valid_tree_dict):
        (tasks / f"bad-{name}.json").write_bytes(path.read_bytes())
    proc = run_cli("list", "--store", str(store))
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert "good-one" in proc.stdout
    assert proc.stdout.count("[unreadable]") >= 15


# ------------------------------------------------------------------ SPEC invariants


def _mutations(v: dict) -> list[tuple[str, dict, str, str]]:
    """(case, tree dict, node named in the message, rule) for each SPEC invariant."""
    out = []
    nodes = v["nodes"]
    steer = next(n for n in nodes if n.get("replaces"))
    human = next(n for n in nodes if n["author"] == "human")
    model = next(n for n in nodes if n["author"] == "model" and n["logprobs"])

    d = copy.deepcopy(v)
    d["nodes"].append(copy.deepcopy(d["nodes"][0]))
    out.append(("unique ids", d, d["nodes"][0]["id"], "unique ids"))

    d = copy.deepcopy(v)
    dn = next(n for n in d["nodes"] if n["id"] == model["id"])
    dn["parent"] = "n999"
    out.append(("parent exists", d, model["id"], "parent exists"))

    d = copy.deepcopy(v)
    a, b = d["nodes"][0], d["nodes"][1]
    a["parent"], b["parent"] = b["id"], a["id"]
    out.append(("cycle", d, None, "no cycles"))

    d = copy.deepcopy(v)
    d["nodes"][0]["parent"] = d["nodes"][0]["id"]
    out.append(("self-parent", d, d["nodes"][0]["id"], "no cycles"))

    d = copy.deepcopy(v)
    dn = next(n for n in d["nodes"] if n["id"] == steer["id"])
    dn["replaces"] = "n999"
    out.append(("replaces missing", d, steer["id"], "replaces names a model sibling"))

    d = copy.deepcopy(v)
    dn = next(n for n in d["nodes"] if n["id"] == steer["id"])
    dn["replaces"] = d["nodes"][0]["id"] if d["nodes"][0]["parent"] != steer["parent"] else steer["id"]
    out.append(("replaces non-sibling", d, steer["id"], "replaces names a model sibling"))

    d = copy.deepcopy(v)
    dn = next(n for n in d["nodes"] if n["id"] == steer["id"])
    other = copy.deepcopy(human)
    other.update(id="n900", parent=steer["parent"], replaces=None, kind="append")
    d["nodes"].append(other)
    dn["replaces"] = "n900"
    out.append(("replaces human", d, steer["id"], "replaces names a model sibling"))

    d = copy.deepcopy(v)
    dn = next(n for n in d["nodes"] if n["id"] == model["id"])
    dn["logprobs"] = dn["logprobs"][:-1]
    out.append(("logprobs length", d, model["id"], "len(logprobs) == len(tokens)"))

    d = copy.deepcopy(v)
    dn = next(n for n in d["nodes"] if n["id"] == model["id"])
    dn["tokens"][0] = d["model"]["n_vocab"]
    out.append(("token id >= n_vocab", d, model["id"], "token id < n_vocab"))

    d = copy.deepcopy(v)
    dn = next(n for n in d["nodes"] if n["id"] == model["id"])
    dn["tokens"][0] = -1
    out.append(("negative token id", d, model["id"], "token id < n_vocab"))
    return out


def test_every_invariant_is_named_with_file_node_and_rule(tmp_path, valid_tree_dict):
    load_tree(_write(tmp_path, "ok.json", valid_tree_dict))  # the base is valid
    cases = _mutations(valid_tree_dict)
    for case, d, node, rule in cases:
        p = _write(tmp_path, f"{case.replace(' ', '_')}.json", d)
        with pytest.raises(TreeError) as ei:
            load_tree(p)
        e = ei.value
        assert e.file == str(p) and e.rule == rule, (case, str(e))
        if node is not None:
            assert e.node == node and repr(node) in str(e), (case, str(e))
    case, d, node, rule = cases[4]
    p = tmp_path / "cli.json"
    p.write_text(json.dumps(d))
    assert_user_error(run_cli("show", str(p)), str(p), rule, node)


# ------------------------------------------------------------------ other models


def test_tree_from_another_model_warns_or_refuses(tmp_path):
    with build_session(tmp_path) as s:
        tid = s.task_id
    other_file = FakeEngine(scripts=("Completely different",))  # same vocabulary, other weights
    with pytest.warns(ModelMismatchWarning, match=tid):
        with Session.open(store=tmp_path, task_id=tid, model=other_file) as s2:
            assert s2.warnings
    path = Store(tmp_path).task_path(tid)
    d = json.loads(path.read_text())
    d["model"]["vocab_sha256"] = "0" * 64
    d["model"]["n_vocab"] = 999
    path.write_text(json.dumps(d))
    with pytest.raises(ModelMismatch) as ei:
        Session.open(store=tmp_path, task_id=tid, model=FakeEngine())
    assert str(path) in str(ei.value) and "vocabulary" in str(ei.value)
    # the refusal released the lock: a later open with the right model is possible
    Store(tmp_path).lock(tid).release()


def test_training_refuses_or_retokenizes_mismatched_vocab(tmp_path):
    """A tree made with another vocabulary must never reach training as raw ids."""
    data = pytest.importorskip("train.data")
    from train.retokenize import VocabCheck
    with build_session(tmp_path) as s:
        tree = s.tree

    class OtherTok:  # a tokenizer that is not the tree's
        eos_token_id = 0

        def __call__(self, text, add_special_tokens=False, return_offsets_mapping=False):
            ids = [ord(c) % 50 for c in text]
            out = {"input_ids": ids}
            if return_offsets_mapping:
                out["offset_mapping"] = [(i, i + 1) for i in range(len(text))]
            return out

    vocab = VocabCheck(tokenizer=OtherTok(), vocab_sha256="f" * 64)
    assert not vocab.same(tree)
    ex = data.build_task(tree, data.DataOptions(), vocab)  # text is re-tokenized, never refused
    assert ex.retokenized
    tok = OtherTok()
    # each steer's sides are its texts in the training tokenizer, not the tree's ids
    by_steer = {p.steer: p for p in ex.pairs}
    for steer in tree.steers():
        pair = by_steer[steer.node.id]
        assert pair.chosen == tok(steer.node.text)["input_ids"], steer.node.text
        assert pair.chosen != steer.chosen  # the tree's own ids would be a different sequence
    assert sorted(by_steer) == sorted(s.node.id for s in tree.steers())
    ids = {t for seq in ex.sft for t in seq.input_ids} | {t for p in ex.pairs for t in p.chosen + p.rejected + p.prefix}
    assert ids and max(ids) < 50  # only the training tokenizer's ids


# ------------------------------------------------------------------ model files


def test_non_gguf_and_truncated_gguf_model(tmp_path, model_path):
    txt = _write(tmp_path, "model.gguf", b"this is not a model\n" * 10)
    trunc = tmp_path / "trunc.gguf"
    with open(model_path, "rb") as fh:
        trunc.write_bytes(fh.read(1 << 20))  # valid magic, cut after 1 MiB
    empty = _write(tmp_path, "empty.gguf", b"")
    tasks = _write(tmp_path, "tasks.jsonl", '{"prompt": "hi"}\n')
    rules = _write(tmp_path, "rules.toml", '[[rule]]\nname = "x"\npattern = "zzz"\naction = "stop"\n')
    for bad in (txt, trunc, empty, tmp_path, tmp_path / "missing.gguf"):
        proc = run_cli("auto", "--model", str(bad), "--rules", str(rules), "--tasks", str(tasks), "--store", str(tmp_path / "s"), "--max-tokens", "2")
        assert_user_error(proc, str(bad))
    for bad in (txt, tmp_path / "missing.gguf"):
        assert_user_error(run_cli("session", "--model", str(bad), "--store", str(tmp_path / "s")), str(bad))
    from steer_tui.core.engine import open_engine
    from steer_tui.core.errors import EngineError

    with pytest.raises(EngineError, match=str(trunc)):
        open_engine(trunc, n_ctx=64)


# ------------------------------------------------------------------ context limits


def test_prompt_longer_than_context(tmp_path):
    with pytest.raises(SessionError, match="context window holds 64"):
        Session.create(store=tmp_path, prompt="word " * 200, model=FakeEngine(n_ctx=64), sampling={"seed": 1})
    assert not list((tmp_path / "tasks").glob("*.json")) if (tmp_path / "tasks").exists() else True


def test_prompt_longer_than_context_via_cli(tmp_path):
    tasks = _write(tmp_path, "tasks.jsonl", json.dumps({"prompt": "word " * 400}) + "\n" + json.dumps({"prompt": "hi"}) + "\n")
    rules = _write(tmp_path, "rules.toml", '[[rule]]\nname = "x"\npattern = "zzz"\naction = "stop"\n')
    proc = run_cli("auto", "--rules", str(rules), "--tasks", str(tasks), "--n-ctx", "64", "--max-tokens", "2", "--store", str(tmp_path / "s"))
    # the long prompt is skipped with a message saying why; the other task still runs
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    (skipped,) = [line for line in proc.stderr.splitlines() if line.startswith("steer-tui: skipped task")]
    assert "context window holds" in skipped and "raise n_ctx or shorten the prompt" in skipped, proc.stderr
    saved = [load_tree(p) for p in (tmp_path / "s" / "tasks").glob("*.json")]
    assert [t.prompt["messages"][-1]["content"] for t in saved] == ["hi"]


def test_generation_hitting_the_context_limit(tmp_path):
    eng = FakeEngine(n_ctx=48)
    s = Session.create(store=tmp_path, prompt="fruits", model=eng, sampling={"temperature": 0, "seed": 1, "max_tokens": 500}, task_id="ctx")
    for _ in range(4):  # continue after each end until the window is full
        list(s.generate())
        if s.last_end == "context":
            break
        s.resample() if s.last_end == "eos" else None
    assert s.last_end == "context"
    assert len(s.context_tokens) == eng.n_ctx
    assert list(s.generate(max_tokens=5)) == [] and s.last_end == "context"  # nothing more, no crash
    with pytest.raises(SessionError, match="context window"):
        s.correct(" more")
    s.rollback(len(s.response_tokens) - 3)
    s.correct(" ok")  # after a rollback there is room again
    t = load_tree(Store(tmp_path).task_path("ctx"))
    assert t.node(s.end).text == " ok"
    s.close()


# ------------------------------------------------------------------ corrections

TEXTS = [
    " pear 🍐, 👩‍👩‍👧 and 🇫🇷",
    " שלום עולם مرحبا",
    " e\u0301cole, cafe\u0301, n\u0303, Z\u0335\u0321a\u0336l\u0337g\u0338o",
    " \u202eevil\u202c and \u200bzero-width",
    " [bold red]not markup[/] \x1b[31mnot red\x1b[0m",
    "\ttabs\nand newlines\r\n",
    "<|im_end|> is just text",
]


def test_correction_text_round_trips_exactly_fake(tmp_path):
    s = build_session(tmp_path, steers=0)
    ids = []
    for t in TEXTS:
        s.resample()
        n = len(s.response_tokens)
        list(s.generate(max_tokens=3))
        s.rollback(n)  # cut what the model just wrote: a steer at a character boundary
        node = s.correct(t)
        assert node.text == t and node.is_steer
        ids.append(node.id)
    s.close()
    raw = Store(tmp_path).task_path(s.task_id).read_text(encoding="utf-8")
    tree = load_tree(Store(tmp_path).task_path(s.task_id))
    for i, t in zip(ids, TEXTS):
        assert tree.node(i).text == t
        assert FakeEngine().detokenize(tree.node(i).tokens) == t
    assert "🍐" in raw and "שלום" in raw  # stored as UTF-8 text, not \u escapes


def test_correction_after_rollback_inside_a_character(tmp_path):
    s = build_session(tmp_path, steers=0)
    s.correct(" 🍐")  # 4 byte tokens on the FakeEngine
    s.rollback(len(s.response_tokens) - 1)  # inside the pear
    node = s.correct(" Fig")
    assert node.text == " Fig"
    s.close()


@pytest.mark.parametrize("text", ["", "   ", "\n\t ", "\u3000"])
def test_empty_or_whitespace_correction_is_refused(tmp_path, text):
    with build_session(tmp_path, steers=0) as s:
        before = len(s.tree.nodes)
        with pytest.raises(SessionError, match="empty|whitespace"):
            s.correct(text)
        assert len(s.tree.nodes) == before


def test_very_long_correction(tmp_path):
    with build_session(tmp_path, steers=0) as s:
        with pytest.raises(SessionError, match="context window"):
            s.correct("x" * 100_000)  # longer than the window: refused, nothing changed
        node = s.correct(" " + "y" * 300)
        assert node.text == " " + "y" * 300
        assert load_tree(s.store.task_path(s.task_id)).node(node.id).text == node.text


@pytest.fixture(scope="module")
def real_engine():
    from steer_tui.core.engine import open_engine

    eng = open_engine(None, n_ctx=512, seed=1)
    yield eng
    eng.close()


def test_correction_text_round_trips_exactly_real_model(tmp_path, real_engine):
    s = Session.create(store=tmp_path, prompt="Say hi.", model=real_engine, sampling={"temperature": 0, "seed": 1}, task_id="real-rt")
    list(s.generate(max_tokens=3))
    ids = []
    for t in TEXTS:
        node = s.correct(t)
        assert node.text == t, (t, node.text)
        ids.append(node.id)
    s.close()
    tree = load_tree(Store(tmp_path).task_path("real-rt"))
    for i, t in zip(ids, TEXTS):
        assert tree.node(i).text == t
        assert real_engine.detokenize(tree.node(i).tokens) == t


# ------------------------------------------------------------------ titles, ids, queues


@pytest.mark.parametrize("title", ["../../../etc/passwd", "..", "a/b\\c", "\x1b]52;c;ZXZpbA==\x07x", "\x00\x01\x7f", "CON", "  ", "🙂" * 50])
def test_titles_never_escape_the_store(tmp_path, title):
    store = tmp_path / "store"
    s = Session.create(store=store, prompt="hi", model=FakeEngine(), sampling={"seed": 1}, title=title)
    s.close()
    files = list((store / "tasks").iterdir())
    assert all(f.parent == store / "tasks" for f in files)
    assert [p for p in tmp_path.rglob("*") if p.is_file() and store not in p.parents] == []
    t = load_tree(Store(store).task_path(s.task_id))
    assert t.title == title  # kept exactly, as data
    proc = run_cli("list", "--store", str(store))
    assert proc.returncode == 0 and "\x1b" not in proc.stdout and "\x07" not in proc.stdout and "\x00" not in proc.stdout


@pytest.mark.parametrize("tid", ["../evil", "/abs", "a/b", "..", ".hidden", "-rf", "x" * 200, "nul\x00", "esc\x1b[2J"])
def test_bad_task_ids_are_refused(tmp_path, tid):
    with pytest.raises(StoreError, match="task id"):
        Session.create(store=tmp_path, prompt="hi", model=FakeEngine(), sampling={"seed": 1}, task_id=tid)
    if "\x00" in tid:
        return  # a NUL cannot be passed in argv
    proc = run_cli("show", tid, "--store", str(tmp_path))
    assert_user_error(proc)
    assert "\x1b" not in proc.stderr


def test_task_queue_bad_lines_are_reported_by_number_rest_used(tmp_path):
    lines = [
        '{"prompt": "good one"}',
        "not json",
        "",
        "# a comment",
        '{"prompt": ""}',
        '["a", "list"]',
        '{"messages": [{"role": "system", "content": "only system"}]}',
        '{"prompt": "x", "messages": [{"role": "user", "content": "y"}]}',
        '{"prompt": 42}',
        '{"messages": [{"role": "hacker", "content": "y"}]}',
        '{"prompt": "good two", "title": "\\u001b[31mred"}',
        '{"prompt": "bad id", "id": "../../escape"}',
    ]
    p = tmp_path / "tasks.jsonl"
    p.write_bytes(("\n".join(lines) + "\n").encode() + b"\xff\xfe bad bytes\n")
    rules = _write(tmp_path, "rules.toml", '[[rule]]\nname = "x"\npattern = "zzz"\naction = "stop"\n')
    proc = run_cli("auto", "--dry-run", "--rules", str(rules), "--tasks", str(p), "--max-tokens", "2", "--store", str(tmp_path / "s"))
    assert "Traceback" not in proc.stderr, proc.stderr
    for lineno in (2, 5, 6, 7, 8, 9, 10, 13):
        assert f"{p}:{lineno}:" in proc.stderr, (lineno, proc.stderr)
    assert f"{p}:1:" not in proc.stderr and f"{p}:11:" not in proc.stderr
    assert "\x1b" not in proc.stderr


def test_bad_rules_files_are_clear_errors(tmp_path):
    tasks = _write(tmp_path, "tasks.jsonl", '{"prompt": "hi"}\n')
    cases = {
        "missing.toml": None,
        "bad.toml": "[[rule]\nname = ",
        "regex.toml": '[[rule]]\nname = "x"\npattern = "(unclosed"\naction = "stop"\n',
        "action.toml": '[[rule]]\nname = "x"\npattern = "a"\naction = "explode"\n',
    }
    for name, text in cases.items():
        p = tmp_path / name
        if text is not None:
            p.write_text(text, encoding="utf-8")
        proc = run_cli("auto", "--dry-run", "--rules", str(p), "--tasks", str(tasks), "--max-tokens", "2", "--store", str(tmp_path / "s"))
        assert_user_error(proc, str(p))


def test_revised_correction_is_not_trained_on(tmp_path):
    from steer_tui.core.export import sft_rows

    s = Session.create(store=tmp_path, prompt="fruits", model=FakeEngine(), sampling={"temperature": 0, "seed": 1}, task_id="rev")
    list(s.generate(max_tokens=12))
    s.rollback(5)
    s.correct(" Kiwi and Lime")
    s.rollback(5 + 5)  # inside the correction, after " Kiwi"
    s.correct(" and Plum")
    s.close()
    completions = [r["completion"] for r in sft_rows(load_tree(Store(tmp_path).task_path("rev")))]
    assert not any("Lime" in c for c in completions), completions
