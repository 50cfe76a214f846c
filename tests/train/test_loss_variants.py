"""The loss variants of issue #14 (APO-zero, ORPO, a weight on the first divergent token) train
the tiny Llama in the direction of the steers, and ``--init-adapter`` goes on training a saved
adapter instead of a fresh one."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from tests.train.tiny import save_tiny_model, synthetic_tree, tiny_llama, write_trees  # noqa: E402
from train.config import ConfigError, make_config  # noqa: E402
from train.data import DataOptions, build_task  # noqa: E402
from train.model_setup import build_peft_model  # noqa: E402
from train.trainer import SteerTrainer, TaskDataset, training_arguments  # noqa: E402


def train_tiny(tmp_path, monkeypatch=None, **over):
    cfg = make_config(data=["x"], out=str(tmp_path), lr=2e-2, lora_r=8, lora_alpha=16, lora_dropout=0.0,
                      kl_weight=0.05, max_steps=10, batch_size=4, progress=False, save_steps=1000, warmup_ratio=0.0,
                      scheduler="constant", **over)
    tasks = [build_task(synthetic_tree(f"t{i}", i), DataOptions()) for i in range(4)]
    model = build_peft_model(tiny_llama(), cfg)
    trainer = SteerTrainer(model=model, args=training_arguments(cfg, tmp_path), train_dataset=TaskDataset(tasks),
                           steer_config=cfg)
    trainer.prepare_reference(tasks)
    with torch.no_grad():
        trainer.compute_loss(model, {"tasks": tasks})
    trainer.initial = {k: v[-1] for k, v in trainer._metrics.items()}
    trainer._metrics.clear()
    trainer.train()
    return trainer


@pytest.mark.parametrize("over", [{"loss_type": "apo_zero"}, {"loss_type": "orpo"}, {"first_token_weight": 3.0}],
                         ids=["apo_zero", "orpo", "first_token_weight"])
def test_loss_variants_raise_the_chosen_over_the_rejected(over, tmp_path, monkeypatch):
    import train.trainer as T

    weights = []
    real = T.span_logps
    monkeypatch.setattr(T, "span_logps", lambda *a, **k: (weights.append(k.get("first_weight")), real(*a, **k))[1])
    trainer = train_tiny(tmp_path, **over)
    assert set(weights) == {over.get("first_token_weight", 1.0)}  # the flag reaches the span sums
    if over.get("loss_type") == "apo_zero":  # identity adapter: (1 - sigmoid(0)) + sigmoid(0) = 1, not log 2
        assert trainer.initial["dpo_loss"] == pytest.approx(1.0, abs=1e-5)
    first, last = trainer.history[0], trainer.history[-1]
    # the implicit reward margin (chosen minus rejected log-ratio vs the reference) starts at 0
    # (identity adapter) and must grow: every variant pushes the correction above the cut text
    assert last["rewards/margin"] > max(first["rewards/margin"], 0) + 0.05, (first, last)
    assert last["loss"] < first["loss"]
    if over.get("loss_type") == "orpo":  # ORPO = the chosen-span NLL + the odds-ratio term
        assert "rpo_loss" in last


def test_init_adapter_starts_from_the_saved_weights_and_trains_them(tmp_path):
    from train.cli import main

    data = write_trees(tmp_path / "trees", n_tasks=3)
    model_dir = save_tiny_model(tmp_path / "tiny")
    first = tmp_path / "round1"
    common = ["--data", str(data), "--model", model_dir, "--eval-fraction", "0", "--no-progress", "-q", "--no-gguf",
              "--lr", "1e-2"]
    assert main([*common, "--out", str(first), "--max-steps", "4"]) == 0
    from safetensors.torch import load_file

    saved = load_file(first / "adapter_model.safetensors")
    assert any(k.endswith("lora_B.weight") and v.abs().max() > 0 for k, v in saved.items())

    from transformers import AutoModelForCausalLM

    cfg = make_config(data=["x"], out=str(tmp_path / "o"), init_adapter=str(first), progress=False)
    model = build_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), cfg)
    got = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert got and all(p.requires_grad for p in got.values()), "the loaded adapter must be trainable"
    for name, p in got.items():  # PEFT names the live parameter ...lora_A.default.weight
        key = name.replace(".default", "")
        assert torch.equal(p.detach().cpu(), saved[key].to(p.dtype)), name

    second = tmp_path / "round2"
    assert main([*common, "--out", str(second), "--max-steps", "2", "--init-adapter", str(first)]) == 0
    moved = load_file(second / "adapter_model.safetensors")
    assert set(moved) == set(saved)
    assert any(not torch.equal(moved[k], saved[k]) for k in saved), "round 2 did not train the adapter"
    m = json.loads((second / "metrics.json").read_text())
    assert m["config"]["init_adapter"] == str(first)


def test_init_adapter_errors_name_the_flag(tmp_path):
    cfg = make_config(data=["x"], out=str(tmp_path / "o"), init_adapter=str(tmp_path), progress=False)
    with pytest.raises(ConfigError, match="--init-adapter .*adapter_config.json"):
        build_peft_model(tiny_llama(), cfg)


def test_first_token_weight_must_be_positive():
    with pytest.raises(ConfigError, match="--first-token-weight"):
        make_config(data=["x"], out="o", first_token_weight=0.0)
