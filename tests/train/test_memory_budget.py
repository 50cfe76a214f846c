"""Memory bounded by --token-budget in every packing mode (a step runs in micro-batches with
the whole batch's normalisers: same loss, same gradient), and the memory model: its estimate
against a measured peak, and the refusal before an OOM."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import weakref

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from tests.train.tiny import save_tiny_model, synthetic_tree, tiny_llama, write_trees  # noqa: E402
from train.config import make_config  # noqa: E402
from train.data import DataOptions, build_task  # noqa: E402
from train.batching import Batch, forwarded_tokens  # noqa: E402
from train.model_setup import build_peft_model  # noqa: E402
from train.trainer import SteerTrainer, TaskDataset, training_arguments  # noqa: E402


def tasks_of(n, steers):
    return [build_task(synthetic_tree(f"t{i}", i, n_steers=steers), DataOptions()) for i in range(n)]


@pytest.mark.parametrize("packing", ["tree", "none"])
@pytest.mark.parametrize("budget", [30, 64, 200])
def test_split_respects_the_budget_and_keeps_pairs_whole(packing, budget):
    b = Batch(tasks_of(3, 6), use_sft=True, use_pairs=True)
    micro = b.split(budget, packing)
    assert len(micro) > 1
    seen = []
    for mb in micro:
        n = forwarded_tokens(mb.sequences, packing, budget)
        units = len(mb.sft) + len(mb.pairs)
        assert n <= budget or units == 1, (n, units)  # only a single oversized unit may exceed
        for p, c, r in zip(mb.pairs, mb.chosen_idx, mb.rejected_idx):
            assert mb.sequences[c] == p.chosen_ids and mb.sequences[r] == p.rejected_ids
        seen += mb.keys
    assert sorted(seen) == sorted(b.keys) and len(seen) == len(b.keys)


def make_trainer(tmp_path, tasks, **kw):
    base = dict(data=["x"], out=str(tmp_path), objective="sft+dpo", lora_r=4, lora_dropout=0.0, kl_weight=1.0,
                rpo_alpha=0.3, progress=False, batch_size=len(tasks))
    base.update(kw)
    cfg = make_config(**base)
    model = build_peft_model(tiny_llama(), cfg)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.add_(0.1)
    trainer = SteerTrainer(model=model, args=training_arguments(cfg, tmp_path), train_dataset=TaskDataset(tasks),
                           steer_config=cfg)
    trainer.prepare_reference(tasks)
    trainer.current_gradient_accumulation_steps = 1
    return trainer


def step(trainer, tasks):
    model = trainer.model
    model.zero_grad(set_to_none=True)
    trainer._metrics.clear()
    loss = trainer.training_step(model, {"tasks": tasks})
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return float(loss), {k: v[-1] for k, v in trainer._metrics.items()}, grads


@pytest.mark.parametrize("packing,kl_mode,accum", [("tree", "full", 1), ("tree", "token", 1), ("none", "full", 1),
                                                   ("none", "token", 1), ("tree", "full", 3)])
def test_micro_batches_give_the_batch_loss_and_gradient(tmp_path, packing, kl_mode, accum):
    """fp32 noise only: the terms are the same sums split in pieces (1e-5, see
    test_memory_logits for the bound). With gradient accumulation the micro-batches' own
    backward is divided like the Trainer divides the returned loss."""
    tasks = tasks_of(3, 4)
    whole = make_trainer(tmp_path / "a", tasks, token_budget=4096, packing=packing, kl_mode=kl_mode)
    small = make_trainer(tmp_path / "b", tasks, token_budget=40, packing=packing, kl_mode=kl_mode)
    whole.current_gradient_accumulation_steps = small.current_gradient_accumulation_steps = accum
    b = Batch(tasks, use_sft=True, use_pairs=True)
    assert len(b.split(4096, packing)) == 1 and len(b.split(40, packing)) >= 4
    lw, mw, gw = step(whole, tasks)
    ls, ms, gs = step(small, tasks)
    assert ls == pytest.approx(lw, abs=1e-5)
    assert mw.keys() == ms.keys() and {"sft_loss", "dpo_loss", "rpo_loss", "kl"} <= mw.keys()
    for k in mw:
        assert ms[k] == pytest.approx(mw[k], abs=1e-5), k
    assert gw.keys() == gs.keys() and gw
    for n in gw:
        torch.testing.assert_close(gs[n], gw[n], atol=1e-5, rtol=1e-4, msg=n)


class LiveSaved:
    """Peak of the bytes held by tensors autograd saved, as they are freed (parameters out)."""

    def __init__(self, model):
        self.params = {p.untyped_storage()._cdata for p in model.parameters()}
        self.live = {}
        self.now = self.peak = 0

    def pack(self, t):
        st = t.untyped_storage()
        key = st._cdata
        if key not in self.params and key not in self.live:
            n = st.nbytes()
            self.live[key] = n
            self.now += n
            self.peak = max(self.peak, self.now)
            weakref.finalize(t, self._free, key)
        return t

    def _free(self, key):
        self.now -= self.live.pop(key, 0)

    def __enter__(self):
        self.ctx = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)
        self.ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self.ctx.__exit__(*exc)


@pytest.mark.parametrize("packing", ["tree", "none"])
def test_step_memory_is_bounded_by_the_budget_not_the_batch(tmp_path, packing):
    """The issue's OOM: with --packing none a step's memory grew with its tasks. Now the
    saved-for-backward bytes alive at any time stay put when the batch grows 4x (budget 256 >=
    the longest SFT path, ~180 tokens), whereas one piece (budget larger than the batch) grows
    with it."""
    peaks = {}
    for n_tasks in (1, 4):
        tasks = tasks_of(n_tasks, 24)
        for budget in (256, 100_000):
            tr = make_trainer(tmp_path / f"{n_tasks}-{budget}", tasks, token_budget=budget, packing=packing)
            with LiveSaved(tr.model) as live:
                step(tr, tasks)
            peaks[n_tasks, budget] = live.peak
    print(packing, {k: v >> 10 for k, v in peaks.items()}, "KiB")
    assert peaks[4, 100_000] > 2.5 * peaks[1, 100_000]  # unbounded: grows with the batch
    assert peaks[4, 256] <= 1.3 * peaks[1, 256]  # bounded by the budget
    assert peaks[4, 256] * 2.5 < peaks[4, 100_000]


WORKER = r"""
import json, os, resource, sys, pathlib
import torch
torch.set_num_threads(1)
from transformers import LlamaConfig, LlamaForCausalLM
from tests.train.tiny import synthetic_tree
from train.config import make_config
from train.data import DataOptions, build_task
from train.memory import estimate_memory
from train.model_setup import build_peft_model
from train.trainer import SteerTrainer, TaskDataset, training_arguments

def rss():
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

budget, out = int(sys.argv[1]), sys.argv[2]
torch.manual_seed(0)
cfg = LlamaConfig(vocab_size=32000, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                  num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=8192, tie_word_embeddings=True)
cfg._attn_implementation = "eager"
tc = make_config(data=["x"], out=out, objective="sft+dpo", lora_r=8, token_budget=budget, kl_weight=1.0,
                 progress=False, batch_size=2, max_steps=1)
tasks = [build_task(synthetic_tree(f"t{i}", i, n_steers=120), DataOptions()) for i in range(2)]
model = build_peft_model(LlamaForCausalLM(cfg), tc)
trainer = SteerTrainer(model=model, args=training_arguments(tc, pathlib.Path(out)), train_dataset=TaskDataset(tasks),
                       steer_config=tc)
trainer.prepare_reference(tasks)
est = estimate_memory(model, tokens=budget)
trainer.create_optimizer_and_scheduler(num_training_steps=1)
trainer.current_gradient_accumulation_steps = 1
before = rss()
trainer.training_step(model, {"tasks": tasks})
trainer.optimizer.step()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"estimate": est.to_allocate, "measured": peak - before}))
"""


def test_estimate_against_a_measured_peak(tmp_path):
    """A 2-layer Llama (hidden 256, vocab 32k, eager attention) takes one real step over two
    120-steer tasks in micro-batches of ~1,020 tokens (budget 1,024). Measured: the process's
    peak RSS during the step minus its RSS just before (weights, reference cache already
    there); estimated: what `estimate_memory` says is still to be allocated, including the
    CPU allocator term (what glibc keeps after frees, and the first step's one-time buffers),
    without which the measured figure sat 1.21-1.42x above the estimate run alone and 2.31x
    once inside the full suite on a loaded 2-core machine; with it 0.98 run alone
    (bench/memory_estimate.py has the grid). The bound stays 0.5-3.0x: the heap's state
    varies with what ran before."""
    env = {**os.environ, "PYTHONPATH": os.getcwd(), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", WORKER, "1024", str(tmp_path)], env=env, capture_output=True,
                          text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    ratio = got["measured"] / got["estimate"]
    print(f"estimate {got['estimate'] / 2**20:.0f} MiB, measured {got['measured'] / 2**20:.0f} MiB, ratio {ratio:.2f}")
    assert 0.5 <= ratio <= 3.0


def test_estimate_grows_with_the_budget_and_checkpointing_shrinks_it():
    from train.memory import estimate_memory

    model = build_peft_model(tiny_llama(), make_config(data=["x"], out="x", lora_r=4))
    rng_before = torch.random.get_rng_state()
    small, big = (estimate_memory(model, tokens=t) for t in (512, 2048))
    ckpt = estimate_memory(model, tokens=2048, gradient_checkpointing=True)
    assert torch.equal(torch.random.get_rng_state(), rng_before)  # the probe leaves the run's RNG alone
    assert big.activations > 3 * small.activations  # linear + quadratic (eager attention scores)
    assert ckpt.activations < big.activations
    assert big.weights == small.weights > 0 and big.trainable_state > 0
    # a device where 512 tokens fit but 2048 do not: the suggestion is the budget that fits
    from train.memory import HEADROOM, suggest

    big.available = int(small.to_allocate / HEADROOM * 1.02)
    assert not big.fits
    tips = suggest(model, big, kl=True, packing="tree", gradient_checkpointing=False)
    assert tips[0].startswith("--token-budget 512 ") and tips[1].startswith("--gradient-checkpointing")


def test_refusal_names_what_to_change_and_the_flag_overrides(tmp_path, monkeypatch, capsys):
    import train.memory as memory
    from train.cli import main

    data = write_trees(tmp_path / "trees", n_tasks=3)
    model_dir = save_tiny_model(tmp_path / "tiny")
    # a device with 1 MiB free: nothing fits
    monkeypatch.setattr(memory, "available_bytes", lambda device: 1 << 20)
    args = ["--data", str(data), "--model", model_dir, "--max-steps", "1", "--eval-fraction", "0", "--no-progress",
            "-q", "--no-gguf"]
    rc = main(args + ["--out", str(tmp_path / "refused")])
    err = capsys.readouterr().err
    assert rc == 3
    assert "will not fit" in err and "estimated peak" in err and "available 0.00 GiB" in err
    assert "--token-budget" in err and "--gradient-checkpointing" in err and "QLoRA" in err
    assert "--ignore-memory-check" in err
    assert not (tmp_path / "refused" / "adapter_model.safetensors").exists()  # refused before training
    rc = main(args + ["--out", str(tmp_path / "forced"), "--ignore-memory-check"])
    out = capsys.readouterr().out
    assert rc == 0 and "estimated peak memory per device" in out
    m = json.loads((tmp_path / "forced" / "metrics.json").read_text())
    assert m["memory_estimate"]["peak_bytes"] > 0 and m["memory_estimate"]["available"] == 1 << 20


def test_estimate_is_printed_before_training(tmp_path, capsys):
    from train.cli import main

    data = write_trees(tmp_path / "trees", n_tasks=2)
    rc = main(["--data", str(data), "--model", save_tiny_model(tmp_path / "tiny"), "--out", str(tmp_path / "o"),
               "--max-steps", "1", "--eval-fraction", "0", "--no-progress", "-q", "--no-gguf", "--token-budget", "64"])
    assert rc == 0
    line = [ln for ln in capsys.readouterr().out.splitlines() if "estimated peak memory" in ln]
    assert line and "tokens per micro-batch" in line[0]
