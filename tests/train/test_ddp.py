"""DDP smoke test: 2 CPU processes on gloo via torchrun and via accelerate launch, a few steps
on the tiny Llama."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

pytest.importorskip("torch")
pytest.importorskip("peft")

from tests.train.tiny import save_tiny_model, write_trees  # noqa: E402


def _free_port() -> int:
    with socket.socket() as sock:  # a free port for the rendezvous
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


LAUNCHERS = {
    "torchrun": lambda port: [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                              "--master_port", str(port)],
    # --multi_gpu selects accelerate's torch.distributed launcher; with no GPU the processes
    # run on the CPU and the Trainer picks the gloo backend (--cpu alone means one process)
    "accelerate": lambda port: [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                                "--main_process_port", str(port)],
}


@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
def test_two_cpu_processes(tmp_path, launcher):
    if launcher == "accelerate":
        pytest.importorskip("accelerate")
    data = write_trees(tmp_path / "trees", n_tasks=6)
    model = save_tiny_model(tmp_path / "tiny")
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd(), "HF_HOME": str(tmp_path / "hf")}
    cmd = LAUNCHERS[launcher](_free_port()) + [
        "-m", "train.cli", "--data", str(data), "--out", str(out), "--model", model, "--max-steps", "3",
        "--batch-size", "2", "--token-budget", "40", "--lr", "1e-2", "--eval-fraction", "0.34",
        "--no-progress", "-q", "--no-gguf"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = json.loads((out / "metrics.json").read_text())
    assert m["train"]["world_size"] == 2 and m["train"]["global_step"] == 3
    assert (out / "adapter_model.safetensors").is_file()
    assert m["eval"]["after"]["reward_margin"] > 0
