"""steer-tui list / show / export and the task-queue parser."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from steer_tui.cli import main
from steer_tui.core.store import Store
from steer_tui.core.tasks import TaskQueueError, load_task_queue
from tests.core.test_tree import human_node, make_tree, model_node


def store_with_steers(root, model_path=None):
    s = Store(root)
    t = make_tree()
    t.title = "fruit [bold]list[/bold] \x1b]8;;http://x\x07"
    if model_path is not None:
        t.model["path"] = str(model_path)
    a = model_node(t, None, [10, 11, 12, 13, 14])
    tail = t.split(a.id, 2, "kl", "mno")
    h = human_node(t, a.id, [30, 31], replaces=tail.id)
    b = model_node(t, h.id, [40, 41], end="eos")
    t.accepted.append(b.id)
    # a discarded steer contributes nothing
    tail2 = t.split(b.id, 1, "o", "p")
    d = human_node(t, b.id, [50], replaces=tail2.id)
    t.discarded.append(d.id)
    s.save(t)
    return s, t


def test_list_and_show(tmp_path, capsys):
    store_with_steers(tmp_path)
    assert main(["list", "--store", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "t1" in out and "\x1b" not in out and "\\x1b" in out
    assert main(["show", "t1", "--store", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "STEER" in out and "replaces n2" in out and "rejected by n3" in out
    assert "DISCARDED" in out and "ACCEPTED" in out
    assert "\x1b" not in out and "\x07" not in out


def test_show_missing_task_is_one_clear_line(tmp_path, capsys):
    assert main(["show", "nope", "--store", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("steer-tui: ") and "nope.json" in err and "Traceback" not in err


def test_show_bad_task_id(tmp_path, capsys):
    assert main(["show", "../../etc/passwd", "--store", str(tmp_path)]) == 2
    assert "not valid" in capsys.readouterr().err


def test_export_formats_load_with_datasets(tmp_path, capsys):
    datasets = pytest.importorskip("datasets")
    store_with_steers(tmp_path / "store")
    rows = {}
    for fmt in ("dpo", "sft", "kto", "trees"):
        out = tmp_path / f"{fmt}.jsonl"
        assert main(["export", "--format", fmt, "--out", str(out), "--store", str(tmp_path / "store")]) == 0
        rows[fmt] = [json.loads(x) for x in out.read_text().splitlines()]
        ds = datasets.load_dataset("json", data_files=str(out), split="train")
        assert len(ds) == len(rows[fmt])
    (dpo,) = rows["dpo"]  # the discarded steer is not exported
    assert dpo["prompt_token_ids"] == [1, 5, 10, 11]
    assert dpo["chosen_token_ids"] == [30, 31]
    assert dpo["rejected_token_ids"] == [12, 13]  # K = chosen length
    assert dpo["prompt"] == "hi" + "kl"
    assert {"prompt", "chosen", "rejected"} <= dpo.keys()
    (sft,) = rows["sft"]
    assert sft["completion_token_ids"] == [10, 11, 30, 31, 40, 41]
    assert sft["completion_weights"] == [0, 0, 1, 1, 0, 0]
    assert sft["accepted"] is True
    labels = sorted(r["label"] for r in rows["kto"])
    assert labels == [False, True, True]
    assert rows["trees"][0]["format"] == "steer-tree"


def test_export_rejected_text_uses_model_vocab(tmp_path, model_path):
    from steer_tui.core.export import dpo_rows, llama_detokenizer

    detok = llama_detokenizer(model_path)
    _, t = store_with_steers(tmp_path, model_path)
    (row,) = list(dpo_rows(t, detok))
    assert row["rejected"] == detok([12, 13]).decode()


def test_task_queue_reports_bad_lines_and_keeps_the_rest(tmp_path):
    p = tmp_path / "q.jsonl"
    p.write_text(
        "\n".join(
            [
                json.dumps({"prompt": "one"}),
                "{broken",
                json.dumps({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "two"}], "id": "b"}),
                json.dumps({"prompt": ""}),
                json.dumps({"prompt": "x", "messages": []}),
                json.dumps({"messages": [{"role": "wizard", "content": "x"}]}),
                "# a comment",
                "",
                json.dumps(["not", "an", "object"]),
                json.dumps({"prompt": "three", "title": "Third"}),
            ]
        )
    )
    tasks, errors = load_task_queue(p)
    assert [t.display_title for t in tasks] == ["one", "two", "Third"]
    assert [t.line for t in tasks] == [1, 3, 10]
    assert [e.split(": ")[0] for e in errors] == [f"{p}:{n}" for n in (2, 4, 5, 6, 9)]


def test_task_queue_with_nothing_usable(tmp_path):
    p = tmp_path / "q.jsonl"
    p.write_text("nope\n")
    with pytest.raises(TaskQueueError, match="no usable task"):
        load_task_queue(p)
    with pytest.raises(TaskQueueError, match="no such file"):
        load_task_queue(tmp_path / "missing.jsonl")


def test_console_script_runs_without_torch(tmp_path):
    """The app's import path must never pull torch/transformers/peft or (in core) textual."""
    code = (
        "import sys, steer_tui.cli, steer_tui.core.tree, steer_tui.core.store, steer_tui.core.export;"
        "bad=[m for m in ('torch','transformers','peft','textual') if m in sys.modules];"
        "print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == ""


def test_queue_ids_are_checked_and_made_per_annotator(tmp_path):
    from steer_tui.core.tasks import queue_task_id

    p = tmp_path / "q.jsonl"
    p.write_text(json.dumps({"prompt": "a", "id": "../../x"}) + "\n" + json.dumps({"prompt": "b", "id": "fruit"}) + "\n")
    tasks, errors = load_task_queue(p)
    assert [t.id for t in tasks] == ["fruit"]
    assert errors[0].startswith(f"{p}:1: \"id\": task id '../../x' is not valid")
    assert queue_task_id("fruit", "alice") != queue_task_id("fruit", "bob")
    assert queue_task_id("fruit", "Ünï Côde ../") == "fruit-n-cde"
    assert queue_task_id("fruit", None) == "fruit" and queue_task_id(None, "alice") is None


def test_list_on_an_empty_store(tmp_path, capsys):
    assert main(["list", "--store", str(tmp_path / "fresh")]) == 0
    captured = capsys.readouterr()
    assert captured.out == f"no tasks in {tmp_path / 'fresh' / 'tasks'}\n" and captured.err == ""


def test_export_from_a_missing_dir_is_one_clear_line(tmp_path, capsys):
    store_with_steers(tmp_path / "store")
    out = tmp_path / "dpo.jsonl"
    missing = tmp_path / "nowhere"
    args = ["export", "--format", "dpo", "--out", str(out), "--store", str(tmp_path / "store")]
    assert main([*args, "--from", str(tmp_path / "store"), "--from", str(missing)]) == 2
    err = capsys.readouterr().err
    assert err == f"steer-tui: --from {missing}: no such file or directory\n"
    assert not out.exists()  # nothing half-written


def test_export_rejected_tokens_sets_the_rejected_span(tmp_path, capsys):
    """--rejected-tokens K: the rejected side is the first K tokens the model wrote after the
    cut (following the replaced node's split tail), whatever the chosen length (here 2)."""
    store_with_steers(tmp_path / "store")
    got = {}
    for k in (1, 3, 9):
        out = tmp_path / f"dpo-{k}.jsonl"
        assert main(["export", "--format", "dpo", "--out", str(out), "--store", str(tmp_path / "store"), "--rejected-tokens", str(k)]) == 0
        (row,) = [json.loads(x) for x in out.read_text().splitlines()]
        got[k] = row["rejected_token_ids"]
        assert row["chosen_token_ids"] == [30, 31]
    assert got == {1: [12], 3: [12, 13, 14], 9: [12, 13, 14]}  # the replaced text has 3 tokens
    capsys.readouterr()
    with pytest.raises(SystemExit) as ei:
        main(["export", "--format", "dpo", "--out", str(tmp_path / "x.jsonl"), "--rejected-tokens", "0"])
    assert ei.value.code == 2 and "--rejected-tokens must be positive, got 0" in capsys.readouterr().err


def test_ctrl_c_exits_130_without_a_traceback(tmp_path, monkeypatch, capsys):
    import steer_tui.cli as cli

    def interrupted(ns):
        raise KeyboardInterrupt

    monkeypatch.setitem(cli.COMMANDS, "list", interrupted)
    assert main(["list", "--store", str(tmp_path)]) == 130
    assert capsys.readouterr().err == ""


def test_ctrl_c_during_auto_steering_exits_130_and_keeps_the_saved_tasks(tmp_path, model_path):
    """A real SIGINT to ``steer-tui auto`` while it generates with the bundled model."""
    import os
    import signal
    import time
    from pathlib import Path

    from steer_tui.core.store import load_tree

    repo = Path(__file__).resolve().parents[2]
    rules = tmp_path / "rules.toml"
    rules.write_text('[[rule]]\nname = "x"\npattern = "zzz-never"\naction = "stop"\n')
    tasks = tmp_path / "q.jsonl"
    tasks.write_text(json.dumps({"prompt": "Write a long story about a lighthouse keeper."}) + "\n")
    store = tmp_path / "store"
    env = dict(os.environ, PYTHONPATH=str(repo))
    proc = subprocess.Popen(
        [sys.executable, "-c", "import sys; from steer_tui.cli import main; sys.exit(main())", "auto", "--model", str(model_path),
         "--rules", str(rules), "--tasks", str(tasks), "--samples", "1000", "--max-tokens", "64", "--n-ctx", "512",
         "--store", str(store)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=str(repo),
        # as from a terminal: a shell without job control (a CI runner's `cmd &`) starts the
        # suite with SIGINT ignored, the child inherits that, Python then installs no
        # KeyboardInterrupt handler and the signal is lost (the old intermittent 60 s hang)
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        deadline = time.monotonic() + 120
        while len(list((store / "tasks").glob("*.json"))) < 2:  # steering is under way
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() is not None else "slow"
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    files = list((store / "tasks").glob("*.json"))
    assert len(files) >= 2 and all(load_tree(f).id == f.stem for f in files)  # every saved task loads
