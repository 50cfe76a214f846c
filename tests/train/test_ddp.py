"""2 CPU processes on gloo, a few steps of ``steer-train`` on the tiny Llama: DDP via torchrun and
via ``accelerate launch --config_file configs/accelerate/ddp.yaml``, FSDP2 via
``configs/accelerate/fsdp2.yaml`` (compared with the DDP run), and a NaN run that must end
every rank."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from tests.train.tiny import save_tiny_model, write_trees  # noqa: E402


def _free_port() -> int:
    with socket.socket() as sock:  # a free port for the rendezvous
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "accelerate"


def _accelerate(config: str):
    # the shipped config, run as it is on 2 CPU processes: accelerate launches its
    # torch.distributed workers, which (no GPU) run on gloo; the configs ask for bf16, the CPU
    # trains in fp32
    return lambda port: [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / config),
                         "--num_processes", "2", "--mixed_precision", "no", "--main_process_port", str(port)]


LAUNCHERS = {
    "torchrun": lambda port: [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                              "--master_port", str(port)],
    "accelerate": _accelerate("ddp.yaml"),
}

TRAIN_ARGS = ["--max-steps", "3", "--batch-size", "2", "--token-budget", "40", "--lr", "1e-2", "--eval-fraction", "0.34",
              "--no-progress", "-q"]


def _launch(launcher, root: Path, out: Path, *extra: str, module: str = "train.cli", timeout: int = 300):
    """``launcher -m module`` on the trees and tiny model under ``root`` (made on first use);
    the finished process (a hang fails the test at ``timeout``)."""
    if not (root / "tiny").is_dir():
        write_trees(root / "trees", n_tasks=6)
        save_tiny_model(root / "tiny")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd(), "HF_HOME": str(root / "hf")}
    cmd = launcher(_free_port()) + ["-m", module, "--data", str(root / "trees"), "--out", str(out),
                                    "--model", str(root / "tiny"), *TRAIN_ARGS, *extra]
    try:
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{' '.join(cmd[:6])}...: no exit in {timeout}s (a rank hangs)\n{(exc.stderr or b'')[-3000:]}")


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    """One ``accelerate launch --config_file configs/accelerate/ddp.yaml`` run (the DDP
    reference the FSDP2 run is compared with)."""
    pytest.importorskip("accelerate")
    root = tmp_path_factory.mktemp("ddp")
    return root, _launch(LAUNCHERS["accelerate"], root, root / "out", "--no-gguf")


def _check_ddp(proc, out: Path) -> dict:
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = json.loads((out / "metrics.json").read_text())
    assert m["train"]["world_size"] == 2 and m["train"]["global_step"] == 3
    assert (out / "adapter_model.safetensors").is_file()
    assert m["eval"]["after"]["reward_margin"] > 0
    return m


def test_two_cpu_processes_torchrun(tmp_path):
    proc = _launch(LAUNCHERS["torchrun"], tmp_path, tmp_path / "out", "--no-gguf")
    _check_ddp(proc, tmp_path / "out")


def test_two_cpu_processes_accelerate_ddp_config(ddp_run):
    root, proc = ddp_run
    m = _check_ddp(proc, root / "out")
    assert m["train"]["sharded_parameters"] is False


def test_non_finite_loss_ends_every_rank(tmp_path):
    """--lr 1e30 makes step 2's loss NaN on both ranks: each says so and exits (code 3), and the
    process group is destroyed, so neither hangs at interpreter exit."""
    proc = _launch(LAUNCHERS["torchrun"], tmp_path, tmp_path / "out", "--lr", "1e30", "--no-gguf", timeout=240)
    assert proc.returncode != 0
    assert proc.stderr.count("steer-train: error: loss became nan") == 2, proc.stderr[-3000:]
    assert not (tmp_path / "out" / "adapter_model.safetensors").exists()


def test_fsdp2_config_on_two_cpu_processes(ddp_run, tmp_path):
    """The whole run under ``accelerate launch --config_file configs/accelerate/fsdp2.yaml``
    (`tests.train.fsdp_cpu` lifts accelerate's GPU-only FSDP check): the saved LoRA is the
    whole adapter gathered from both ranks, the same as the DDP run's (fp32 noise: both
    average the same gradients, in another order), and loads into an unsharded model."""
    from peft import PeftModel
    from safetensors.torch import load_file

    from tests.train.tiny import tiny_llama

    root, _ = ddp_run
    out = tmp_path / "out"
    proc = _launch(_accelerate("fsdp2.yaml"), root, out,
                   module="tests.train.fsdp_cpu")
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = json.loads((out / "metrics.json").read_text())
    ddp = json.loads((root / "out" / "metrics.json").read_text())
    assert m["train"]["sharded_parameters"] is True and "FSDP" in m["train"]["distributed_type"]
    assert m["train"]["world_size"] == 2 and m["train"]["global_step"] == 3
    # step 1: the policy is the base (lora_B = 0), so the DPO loss is ln 2 only if the
    # reference log-probs computed through the FSDP wrapper are the base model's
    assert m["history"][0]["dpo_loss"] == pytest.approx(math.log(2), abs=1e-5)
    for side in ("before", "after"):  # the held-out scoring through the wrapper, adapter off and on
        for k in ("chosen_logp", "rejected_logp"):
            assert m["eval"][side][k] == pytest.approx(ddp["eval"][side][k], abs=1e-4), (side, k)
    got = load_file(out / "adapter_model.safetensors")
    want = load_file(root / "out" / "adapter_model.safetensors")
    assert sorted(got) == sorted(want) and len(got) == 28  # 7 projections x 2 layers x (A, B)
    for k, v in want.items():
        assert got[k].shape == v.shape, k  # whole tensors, not one rank's shard
        assert torch.allclose(got[k], v, atol=1e-4), (k, float((got[k] - v).abs().max()))
    assert max(float(v.abs().max()) for k, v in got.items() if "lora_B" in k) > 1e-3  # trained
    ckpt = load_file(out / "checkpoints" / "checkpoint-3" / "adapter_model.safetensors")  # gathered too
    assert sorted(ckpt) == sorted(got) and all(torch.equal(ckpt[k], got[k]) for k in got)
    loaded = PeftModel.from_pretrained(tiny_llama(), str(out))
    for name, p in loaded.named_parameters():
        if "lora_" in name:
            key = name.replace(".default.", ".")
            assert torch.equal(p.detach(), got[key]), name
    import gguf  # the llama.cpp adapter was written from the gathered tensors too

    names = [t.name for t in gguf.GGUFReader(str(out / "adapter.gguf")).tensors]
    assert len(names) == 28 and all(n.endswith((".lora_a", ".lora_b")) for n in names)
