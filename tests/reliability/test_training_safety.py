"""Training safety: weights load only from safetensors/GGUF (a pickle is never unpickled),
model code runs only behind --trust-remote-code, and a NaN/inf loss stops the run keeping
the last good checkpoint (which loads and holds finite weights)."""

from __future__ import annotations

import json
import pickle

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from tests.train.tiny import save_tiny_model, tiny_llama, write_trees  # noqa: E402
from train.config import TrainConfig  # noqa: E402
from train.modeling import ModelError, ModelSource, load_model, resolve_model  # noqa: E402


class _Boom:
    """Unpickling this creates ``marker``: proof that a pickle was executed."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        import pathlib

        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def _pickle_only_model(d, marker):
    tiny_llama().save_pretrained(d, safe_serialization=True)
    (d / "model.safetensors").unlink()
    with open(d / "pytorch_model.bin", "wb") as fh:
        pickle.dump({"model.embed_tokens.weight": _Boom(str(marker))}, fh)
    return d


def test_pickle_weights_are_refused_and_never_unpickled(tmp_path, monkeypatch):
    marker = tmp_path / "PWNED"
    d = _pickle_only_model(tmp_path / "m", marker)
    calls = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append(a) or real_load(*a, **k))
    with pytest.raises(ModelError) as ei:
        load_model(resolve_model(str(d)))
    assert str(d) in str(ei.value)
    assert not marker.exists() and not calls


def test_pickle_model_via_cli_is_a_clear_error(tmp_path):
    import subprocess
    import sys

    from .conftest import REPO

    marker = tmp_path / "PWNED"
    d = _pickle_only_model(tmp_path / "m", marker)
    data = write_trees(tmp_path / "trees", n_tasks=2)
    proc = subprocess.run([sys.executable, "-m", "train.cli", "--data", str(data), "--out", str(tmp_path / "out"), "--model", str(d),
                           "--max-steps", "1", "--no-progress", "-q", "--no-gguf"], capture_output=True, text=True, cwd=str(REPO), timeout=300)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert str(d) in proc.stderr
    assert not marker.exists()


def test_remote_code_needs_the_flag(tmp_path):
    """A model directory whose config points at its own code: without the flag that code never
    runs (the built-in class loads the weights); with it, it does (the positive control that
    shows the marker would appear if the code ran)."""
    d = tmp_path / "m"
    save_tiny_model(d)
    marker = tmp_path / "RAN"
    (d / "evil_model.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n"
                                     "from transformers import LlamaForCausalLM\n"
                                     "class EvilForCausalLM(LlamaForCausalLM):\n    pass\n")
    cfg = json.loads((d / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "evil_model.EvilForCausalLM"}
    (d / "config.json").write_text(json.dumps(cfg))
    assert TrainConfig().trust_remote_code is False
    model, _, _ = load_model(ModelSource("dir", str(d)))  # default: no remote code
    assert type(model).__name__ == "LlamaForCausalLM" and not marker.exists()
    model, _, _ = load_model(ModelSource("dir", str(d)), trust_remote_code=True)
    assert type(model).__name__ == "EvilForCausalLM" and marker.exists()  # the flag does run it


def test_nan_loss_keeps_last_good_checkpoint_loadable(tmp_path, monkeypatch, capsys):
    from safetensors.torch import load_file

    from train.cli import main
    from train.trainer import SteerTrainer

    real = SteerTrainer.loss_terms

    def poisoned(self, *a, **kw):
        out = real(self, *a, **kw)
        if self.state.global_step >= 2:
            out["loss"] = out["loss"] * float("inf")
        return out

    monkeypatch.setattr(SteerTrainer, "loss_terms", poisoned)
    data = write_trees(tmp_path / "trees", n_tasks=3)
    out = tmp_path / "out"
    rc = main(["--data", str(data), "--out", str(out), "--model", save_tiny_model(tmp_path / "tiny"),
               "--max-steps", "6", "--save-steps", "2", "--batch-size", "1", "--eval-fraction", "0", "--no-progress", "-q", "--no-gguf"])
    err = capsys.readouterr().err
    assert rc != 0 and "Traceback" not in err
    assert "checkpoint-2" in err
    ckpts = sorted((out / "checkpoints").glob("checkpoint-*"))
    assert [c.name for c in ckpts] == ["checkpoint-2"]  # nothing saved after the loss broke
    weights = load_file(str(ckpts[0] / "adapter_model.safetensors"))
    assert weights and all(torch.isfinite(w).all() for w in weights.values())
