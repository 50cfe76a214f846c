"""A few real optimisation steps on a tiny random Llama: every objective moves the LoRA
weights and lowers its loss; the CLI writes every output; resume continues."""

from __future__ import annotations

import json
import math

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from tests.train.tiny import save_tiny_model, synthetic_tree, tiny_llama, write_trees  # noqa: E402
from train.config import make_config  # noqa: E402
from train.data import DataOptions, build_task  # noqa: E402
from train.batching import Batch  # noqa: E402
from train.model_setup import build_peft_model  # noqa: E402
from train.reference import ReferenceCache  # noqa: E402
from train.trainer import SteerTrainer, TaskDataset  # noqa: E402


def lora_params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


@pytest.mark.parametrize("objective", ["sft", "dpo", "sft+dpo"])
def test_steps_change_lora_and_lower_loss(objective, tmp_path):
    cfg = make_config(data=["x"], out=str(tmp_path), objective=objective, lr=2e-2, lora_r=8, lora_alpha=16,
                      lora_dropout=0.0, kl_weight=0.05, max_steps=20, batch_size=4, progress=False, save_steps=1000,
                      warmup_ratio=0.0, scheduler="constant")
    tasks = [build_task(synthetic_tree(f"t{i}", i), DataOptions()) for i in range(4)]
    model = build_peft_model(tiny_llama(), cfg)
    from train.trainer import training_arguments

    trainer = SteerTrainer(model=model, args=training_arguments(cfg, tmp_path), train_dataset=TaskDataset(tasks),
                           steer_config=cfg)
    trainer.prepare_reference(tasks)

    def full_loss():
        with torch.no_grad():
            return float(trainer.compute_loss(model, {"tasks": tasks}))

    before_w = lora_params(model)
    before = full_loss()
    if "dpo" in objective:  # adapter starts as identity: every steer's DPO loss is log 2
        assert trainer._metrics["dpo_loss"][-1] == pytest.approx(math.log(2), abs=1e-5)
    trainer._metrics.clear()
    trainer.train()
    after = full_loss()
    after_w = lora_params(model)
    changed = [n for n in before_w if not torch.equal(before_w[n], after_w[n])]
    assert len(changed) >= len(before_w) // 2, "LoRA weights did not move"
    assert after < before * 0.95, (before, after)
    assert trainer.history and all(math.isfinite(h["loss"]) for h in trainer.history)
    if "dpo" in objective:
        assert trainer.history[-1]["rewards/margin"] > 0


def test_eval_mode_scores_without_dropout_and_restores_the_training_flag(tmp_path):
    """train.reference.eval_mode: eval mode inside (dropout off), the adapter disabled only
    for the reference, the training flag restored afterwards, also when the body raises."""
    from train.reference import eval_mode, reference_mode

    cfg = make_config(data=["x"], out=str(tmp_path), lora_r=4, lora_dropout=0.5)
    model = build_peft_model(tiny_llama(), cfg)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.add_(0.5)
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        with model.disable_adapter():
            base = model.eval()(input_ids=ids).logits
        adapted = model(input_ids=ids).logits
        model.train()
        with reference_mode(model):
            assert not model.training
            torch.testing.assert_close(model(input_ids=ids).logits, base)
        assert model.training
        with eval_mode(model):
            torch.testing.assert_close(model(input_ids=ids).logits, adapted)  # dropout off, adapter on
        assert model.training
        model.eval()
        with pytest.raises(KeyError), reference_mode(model):
            raise KeyError("inside")
        assert not model.training
        torch.testing.assert_close(model(input_ids=ids).logits, adapted)  # the adapter is back on


def test_reference_is_the_adapter_disabled_model(tmp_path):
    cfg = make_config(data=["x"], out=str(tmp_path), lora_r=4, lora_dropout=0.0)
    base = tiny_llama()
    tasks = [build_task(synthetic_tree("t", 1), DataOptions())]
    from train.logprobs import token_logprobs

    b = Batch(tasks, use_sft=True, use_pairs=True)
    with torch.no_grad():
        expect = token_logprobs(base, b.sequences)
    model = build_peft_model(base, cfg)
    with torch.no_grad():  # perturb the adapter: the reference must not see it
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.add_(0.5)
    cache = ReferenceCache()
    cache.fill(model, tasks, cfg, True, True)
    got = cache.get(b.keys, "cpu")
    # the cache holds the log-probs a step reads (the DPO spans, and with use_sft the SFT
    # paths' model-written targets); the rest are not computed
    read = b.logp_masks(sft=False, model_tokens=True)
    assert sum(map(sum, read)) > 10
    for e, g, f in zip(expect, got, read):
        f = torch.tensor(f, dtype=torch.bool)
        torch.testing.assert_close(g[f], e[f], atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        moved = token_logprobs(model, b.sequences)
    assert max(float((m - e).abs().max()) for m, e in zip(moved, expect)) > 1e-3


@pytest.mark.parametrize("kl_mode", ["full", "token"])
def test_reference_kl_is_zero_at_start_and_grows_when_the_adapter_moves(kl_mode, tmp_path):
    cfg = make_config(data=["x"], out=str(tmp_path), objective="sft+dpo", lora_r=4, lora_dropout=0.0, kl_weight=1.0,
                      kl_mode=kl_mode, progress=False)
    tasks = [build_task(synthetic_tree(f"t{i}", i), DataOptions()) for i in range(2)]
    model = build_peft_model(tiny_llama(), cfg)
    from train.trainer import training_arguments

    trainer = SteerTrainer(model=model, args=training_arguments(cfg, tmp_path), train_dataset=TaskDataset(tasks),
                           steer_config=cfg)
    trainer.prepare_reference(tasks)
    # only the one-token KL reads cached reference log-probs of the SFT paths
    cached_sft = [k for k in trainer.reference.logps if k[1] == "sft"]
    assert bool(cached_sft) == (kl_mode == "token")
    trainer.compute_loss(model, {"tasks": tasks})
    assert trainer._metrics["kl"][-1] == pytest.approx(0.0, abs=1e-6)  # LoRA B = 0: policy == reference
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.add_(0.3)
    loss = trainer.compute_loss(model, {"tasks": tasks})
    assert trainer._metrics["kl"][-1] > 1e-4
    loss.backward()  # the KL term has a gradient path into the adapter
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "lora_" in n)


def test_training_arguments_refuse_an_unknown_field_by_name(tmp_path):
    """No TrainingArguments option is dropped silently: a misspelt (or removed) one is an
    error naming it; a real one passes through."""
    from train.trainer import training_arguments

    cfg = make_config(data=["x"], out=str(tmp_path), progress=False)
    with pytest.raises(TypeError, match="'learning_rat'"):
        training_arguments(cfg, tmp_path, learning_rat=1e-3)
    assert training_arguments(cfg, tmp_path, logging_first_step=True).logging_first_step is True
    assert training_arguments(cfg, tmp_path).learning_rate == cfg.lr


@pytest.mark.parametrize("kl_mode", ["full", "forward", "symmetric"])
def test_full_kl_matches_the_exact_kl_of_one_forward(kl_mode, tmp_path):
    cfg = make_config(data=["x"], out=str(tmp_path), objective="sft", lora_r=4, lora_dropout=0.0, kl_weight=1.0,
                      kl_mode=kl_mode, sft_weight=0.0, progress=False)
    task = build_task(synthetic_tree("t", 3), DataOptions())
    base = tiny_llama()
    model = build_peft_model(base, cfg)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.add_(0.2)
    from train.trainer import training_arguments

    trainer = SteerTrainer(model=model, args=training_arguments(cfg, tmp_path), train_dataset=TaskDataset([task]),
                           steer_config=cfg)
    trainer.prepare_reference([task])
    trainer.compute_loss(model, {"tasks": [task]})
    got = trainer._metrics["kl"][-1]
    # by hand: every SFT path, one unpacked forward with and without the adapter
    total, n = 0.0, 0
    with torch.no_grad():
        for s in task.sft:
            ids = torch.tensor([s.input_ids])
            lp = model(input_ids=ids).logits[0, :-1].float().log_softmax(-1)
            with model.disable_adapter():
                lq = model(input_ids=ids).logits[0, :-1].float().log_softmax(-1)
            m = torch.tensor(s.model_mask[1:], dtype=torch.bool)
            rev, fwd = (lp.exp() * (lp - lq)).sum(-1), (lq.exp() * (lq - lp)).sum(-1)
            per = {"full": rev, "forward": fwd, "symmetric": rev + fwd}[kl_mode]
            total += float(per[m].sum())
            n += int(m.sum())
    assert n > 0 and got == pytest.approx(total / n, rel=1e-4, abs=1e-7)


@pytest.mark.parametrize("kl_mode", ["full", "forward"])
def test_kept_reference_states_replace_the_per_step_reference_forward(kl_mode, tmp_path, monkeypatch):
    """With the full KL the reference's hidden states at the KL positions are computed once
    (`ReferenceCache.states`); a step then runs no reference forward, and its loss and
    gradients are those of the per-step reference forward (same float32 arithmetic on
    other groupings of the rows: 1e-5 is rounding). Over the memory cap it falls back."""
    import train.trainer as trainer_mod
    from train.trainer import training_arguments

    cfg = make_config(data=["x"], out=str(tmp_path), objective="dpo", lora_r=4, lora_dropout=0.0, kl_weight=2.0,
                      kl_mode=kl_mode, progress=False)
    tasks = [build_task(synthetic_tree(f"t{i}", i), DataOptions()) for i in range(3)]
    model = build_peft_model(tiny_llama(), cfg)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.add_(0.2)  # an adapter that has moved, so the KL and its gradient are not 0

    def run(cap):
        monkeypatch.setattr(trainer_mod, "STATES_BYTES", cap)
        tr = SteerTrainer(model=model, args=training_arguments(cfg, tmp_path), train_dataset=TaskDataset(tasks),
                          steer_config=cfg)
        tr.prepare_reference(tasks)
        calls = []
        real = tr.reference_dists
        monkeypatch.setattr(tr, "reference_dists", lambda *a, **k: calls.append(1) or real(*a, **k))
        model.zero_grad()
        loss = tr.compute_loss(model, {"tasks": tasks})
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return tr, float(loss), grads, len(calls), tr._metrics["kl"][-1]

    kept, loss_k, g_k, calls_k, kl_k = run(1 << 30)
    n_pos = sum(sum(s.model_mask[1:]) for t in tasks for s in t.sft)
    assert len(kept.reference.states) == sum(len(t.sft) for t in tasks)
    assert sum(len(h) for h in kept.reference.states.values()) == n_pos > 0
    assert calls_k == 0
    fresh, loss_f, g_f, calls_f, kl_f = run(0)  # cap 0 bytes: recomputed each step
    assert not fresh.reference.states and calls_f == 1
    assert kl_k > 1e-4 and kl_k == pytest.approx(kl_f, abs=1e-6)
    assert loss_k == pytest.approx(loss_f, abs=1e-5)
    assert g_k.keys() == g_f.keys() and g_k
    for n in g_k:
        torch.testing.assert_close(g_k[n], g_f[n], atol=1e-5, rtol=1e-4, msg=n)


def test_lora_layers_puts_lora_on_the_chosen_blocks_only(tmp_path):
    cfg = make_config(data=["x"], out=str(tmp_path), lora_r=4, lora_layers="last:1")
    model = build_peft_model(tiny_llama(), cfg)
    blocks = {n.split(".layers.")[1].split(".")[0] for n, _ in model.named_parameters() if "lora_A" in n}
    assert blocks == {str(model.config.num_hidden_layers - 1)}
    from train.config import ConfigError

    with pytest.raises(ConfigError, match="--lora-layers .*does not exist"):
        build_peft_model(tiny_llama(), make_config(data=["x"], out=str(tmp_path), lora_layers="0-99"))


def test_cli_run_writes_outputs_and_resumes(tmp_path, monkeypatch):
    import train.run as run_mod
    from train.cli import main

    trained_on: list[set[str]] = []  # the tasks each run handed the Trainer
    real_dataset = run_mod.TaskDataset

    def recording_dataset(examples):
        trained_on.append({e.task for e in examples})
        return real_dataset(examples)

    monkeypatch.setattr(run_mod, "TaskDataset", recording_dataset)

    data = write_trees(tmp_path / "trees", n_tasks=5)
    model_dir = save_tiny_model(tmp_path / "tiny")
    out = tmp_path / "out"
    args = ["--data", str(data), "--out", str(out), "--model", model_dir, "--max-steps", "4", "--save-steps", "2",
            "--lr", "1e-3", "--lora-r", "4", "--eval-fraction", "0.4", "--no-progress", "-q", "--no-gguf"]
    assert main(args) == 0
    for f in ("adapter_model.safetensors", "adapter_config.json", "metrics.json", "training.png"):
        assert (out / f).is_file(), f
    assert list((out / "tensorboard").rglob("events.out.tfevents*"))
    m = json.loads((out / "metrics.json").read_text())
    assert m["train"]["global_step"] == 4
    assert m["data"]["eval_tasks"] == 2 and m["eval"]["before"]["steers"] == 6
    everything = {f"task{i}" for i in range(5)}
    assert len(m["eval_tasks"]) == 2 and set(m["eval_tasks"]) < everything
    # the held-out tasks never reach the Trainer; every other task does
    assert trained_on == [everything - set(m["eval_tasks"])]
    assert main(args[:args.index("--max-steps") + 1] + ["6"] + args[args.index("--max-steps") + 2:] + ["--resume"]) == 0
    m2 = json.loads((out / "metrics.json").read_text())
    assert m2["train"]["global_step"] == 6
    assert m2["history"][0]["step"] > 4  # continued from the checkpoint, did not restart


def test_cli_errors_are_clear(tmp_path, capsys):
    from train.cli import main

    assert main(["--out", str(tmp_path)]) == 2
    assert "--data is required" in capsys.readouterr().err
    assert main(["--data", str(tmp_path / "nope"), "--out", str(tmp_path)]) == 2
    assert "does not exist" in capsys.readouterr().err
    data = write_trees(tmp_path / "trees", n_tasks=1)
    assert main(["--data", str(data), "--out", str(tmp_path / "o"), "--model", "no/such-model-xyz"]) == 2
    assert "not in the local Hugging Face cache" in capsys.readouterr().err
    assert main(["--data", str(data), "--out", str(tmp_path / "o"), "--lr", "-1"]) == 2
    assert "--lr" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--data", str(data), "--objective", "ppo"])


def test_non_finite_loss_stops_and_names_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    from train.cli import main
    from train.trainer import SteerTrainer

    real = SteerTrainer.loss_terms

    def poisoned(self, *a, **kw):
        out = real(self, *a, **kw)
        if self.state.global_step >= 2:
            out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(SteerTrainer, "loss_terms", poisoned)
    data = write_trees(tmp_path / "trees", n_tasks=3)
    out = tmp_path / "out"
    rc = main(["--data", str(data), "--out", str(out), "--model", save_tiny_model(tmp_path / "tiny"),
               "--max-steps", "5", "--save-steps", "2", "--batch-size", "1", "--eval-fraction", "0",
               "--no-progress", "-q", "--no-gguf"])
    err = capsys.readouterr().err
    assert rc == 3
    assert "loss became nan at step 2" in err and "checkpoint-2" in err
    assert (out / "checkpoints" / "checkpoint-2" / "adapter_model.safetensors").is_file()
    assert not (out / "adapter_model.safetensors").exists()  # no final adapter from a broken run


def test_eval_command_before_and_after(tmp_path, capsys):
    from train.cli import main

    data = write_trees(tmp_path / "trees", n_tasks=3)
    model_dir = save_tiny_model(tmp_path / "tiny")
    out = tmp_path / "out"
    assert main(["--data", str(data), "--out", str(out), "--model", model_dir, "--max-steps", "6", "--lr", "1e-2",
                 "--eval-fraction", "0", "--no-progress", "-q", "--no-gguf"]) == 0
    capsys.readouterr()
    assert main(["eval", "--data", str(data), "--model", model_dir, "--adapter", str(out), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["before"]["steers"] == 9 and res["before"]["reward_margin"] == 0
    assert res["after"]["reward_margin"] > 0
    assert main(["eval", "--data", str(data), "--model", model_dir, "--adapter", str(tmp_path)]) == 2
    assert "adapter_config.json" in capsys.readouterr().err


def test_data_module_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys, train.data, train.config; bad = [m for m in ('torch', 'transformers', 'textual') if m in sys.modules]; print(bad)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


def _tiny_run_args(tmp_path, *extra, steps=3):
    data = write_trees(tmp_path / "trees", n_tasks=3)
    return ["--data", str(data), "--out", str(tmp_path / "out"), "--model", save_tiny_model(tmp_path / "tiny"),
            "--max-steps", str(steps), "--lr", "1e-2", "--lora-r", "4", "--eval-fraction", "0", "--no-progress", "-q", *extra]


def test_a_failed_gguf_export_is_reported_and_the_run_still_succeeds(tmp_path, monkeypatch, capsys, caplog):
    """The PEFT adapter is the run's product; a GGUF export that fails is recorded as
    ``adapter_gguf_error`` (and logged), not turned into a failed run."""
    import train.export
    import train.run
    from train.cli import main

    def broken_export(*a, **kw):
        raise train.export.ExportError("gguf-py does not know the architecture 'x'")

    monkeypatch.setattr(train.run, "export_lora_gguf", broken_export)
    out = tmp_path / "out"
    assert main(_tiny_run_args(tmp_path)) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["adapter_gguf_error"] == "gguf-py does not know the architecture 'x'" and "adapter_gguf" not in m
    assert (out / "adapter_model.safetensors").is_file() and not (out / "adapter.gguf").exists()
    assert "adapter.gguf export failed: gguf-py does not know the architecture 'x'" in caplog.text
    assert "adapter.gguf" not in capsys.readouterr().out  # the summary does not claim one


def test_gguf_export_writes_the_adapter_by_default(tmp_path):
    from train.cli import main

    out = tmp_path / "out"
    assert main(_tiny_run_args(tmp_path, steps=1)) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["adapter_gguf"] == str(out / "adapter.gguf") and "adapter_gguf_error" not in m
    assert (out / "adapter.gguf").read_bytes()[:4] == b"GGUF"


def test_merge_writes_a_model_equal_to_base_plus_adapter(tmp_path):
    """--merge: OUT/merged is a plain safetensors model whose logits are the base model's
    with the trained adapter applied (and differ from the base alone)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from train.cli import main

    out = tmp_path / "out"
    assert main(_tiny_run_args(tmp_path, "--merge", "--no-gguf", steps=4)) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["merged"] == str(out / "merged")
    assert (out / "merged" / "model.safetensors").is_file() and not list((out / "merged").glob("*.bin"))
    merged = AutoModelForCausalLM.from_pretrained(out / "merged").eval()
    assert not any("lora" in n for n, _ in merged.named_parameters())
    with_adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "tiny"), out).eval()
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "tiny").eval()
    ids = torch.randint(2, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, want, plain = merged(ids).logits, with_adapter(ids).logits, base(ids).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    assert (got - plain).abs().max() > 1e-3  # the merge carried a trained adapter, not a no-op


def test_resume_without_a_checkpoint_starts_fresh(tmp_path, caplog):
    from train.cli import main

    out = tmp_path / "out"
    assert main(_tiny_run_args(tmp_path, "--resume", "--no-gguf", steps=2)) == 0
    assert "--resume: no checkpoint in" in caplog.text and "starting fresh" in caplog.text
    m = json.loads((out / "metrics.json").read_text())
    assert m["train"]["global_step"] == 2 and m["history"][0]["step"] == 1
