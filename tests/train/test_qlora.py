"""``--load-in-4bit`` (QLoRA): the refusals always run (bitsandbytes missing, or unable to run
NF4 on this device); with bitsandbytes installed and able to run NF4 on this CPU, a tiny
Llama trains 2 steps on an NF4 base, exports, and ``--merge`` writes the model that was
trained (the dequantized NF4 base plus the LoRA delta), not a re-quantized one."""

from __future__ import annotations

import json
import sys
import types

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from tests.train.tiny import save_tiny_model, write_trees  # noqa: E402
from train.cli import main  # noqa: E402
from train.config import ConfigError, make_config  # noqa: E402
from train.quant import bnb_problem, require_bnb  # noqa: E402


def _args(tmp_path, *extra):
    data = write_trees(tmp_path / "trees", n_tasks=3)
    return ["--data", str(data), "--model", save_tiny_model(tmp_path / "tiny"), "--out", str(tmp_path / "out"),
            "--eval-fraction", "0", "--no-progress", "-q", *extra]


def test_without_bitsandbytes_the_flag_is_refused_in_one_line(tmp_path, monkeypatch, capsys):
    args = _args(tmp_path, "--max-steps", "1", "--load-in-4bit")
    capsys.readouterr()
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import raises ImportError
    rc = main(args)
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1, err
    assert "--load-in-4bit" in err and "pip install bitsandbytes" in err
    assert not (tmp_path / "out" / "adapter_model.safetensors").exists()


def test_a_bitsandbytes_without_nf4_here_is_refused_naming_cuda(monkeypatch):
    """A bitsandbytes build whose 4-bit ops have no kernel for this device (older releases
    on a CPU): one line naming the device, CUDA and the flag."""
    def no_kernel(*a, **k):
        raise NotImplementedError("no CPU kernel for quantize_4bit")

    fake = types.ModuleType("bitsandbytes")
    fake.__version__ = "0.0-test"
    fake.functional = types.SimpleNamespace(quantize_4bit=no_kernel, dequantize_4bit=no_kernel)
    monkeypatch.setitem(sys.modules, "bitsandbytes", fake)
    monkeypatch.setitem(sys.modules, "bitsandbytes.functional", fake.functional)
    why = bnb_problem("cpu")
    assert "cannot run NF4 on cpu" in why and "CUDA GPU" in why and "no CPU kernel" in why
    with pytest.raises(ConfigError, match=r"^--load-in-4bit: bitsandbytes 0.0-test cannot run NF4 on cpu"):
        require_bnb("cpu")


def test_refusal_suggests_qlora_only_when_it_would_fit():
    """A model whose Linear weights dominate: when the step does not fit but would with NF4
    weights (the fp32 weights resident now freed), the tips name --load-in-4bit with its
    estimate; a tiny-weight model where activations dominate gets 'not --load-in-4bit alone'."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.train.tiny import tiny_llama
    from train.memory import HEADROOM, estimate_memory, qlora_peak, suggest
    from train.model_setup import build_peft_model

    cfg = make_config(data=["x"], out="x", lora_r=4)
    torch.manual_seed(0)
    big = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=256, intermediate_size=1024, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, attn_implementation="eager"))
    for model, short, fits in ((build_peft_model(big, cfg), 0.99, True), (build_peft_model(tiny_llama(), cfg), 0.1, False)):
        est = estimate_memory(model, tokens=16)
        est.available = int(short * est.to_allocate / HEADROOM)  # does not fit
        assert not est.fits
        tips = suggest(model, est, kl=True, packing="tree", gradient_checkpointing=False)
        q = [t for t in tips if "--load-in-4bit" in t]
        assert len(q) == 1, tips
        peak = qlora_peak(model, est)
        assert f"{peak / 2**30:.2f} GiB" in q[0]
        if fits:
            assert q[0].startswith("--load-in-4bit (QLoRA") and peak < est.peak
        else:
            assert q[0].startswith("not --load-in-4bit alone")


needs_nf4 = pytest.mark.skipif(bnb_problem("cpu") is not None, reason=f"no NF4 on this CPU: {bnb_problem('cpu')}")


@needs_nf4
def test_estimate_counts_nf4_weights_and_their_state(tmp_path):
    from train.memory import estimate_memory
    from train.model_setup import build_peft_model
    from train.quant import load_4bit, nf4_weight_bytes, quantized_bytes

    d = save_tiny_model(tmp_path / "tiny")
    cfg = make_config(data=["x"], out="x", lora_r=4, load_in_4bit=True)
    from transformers import AutoModelForCausalLM

    full = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    q, _ = load_4bit(d, dtype=torch.float32)
    assert quantized_bytes(q) > 0
    predicted = nf4_weight_bytes(full, torch.float32)
    e4 = estimate_memory(build_peft_model(q, cfg), tokens=64)
    ef = estimate_memory(build_peft_model(full, make_config(data=["x"], out="x", lora_r=4)), tokens=64)
    lora = e4.trainable_state // 3  # the LoRA parameters themselves (fp32) are weights too
    assert e4.weights - lora == pytest.approx(predicted, rel=0.02)
    assert e4.weights < ef.weights


@needs_nf4
def test_qlora_trains_two_steps_exports_and_merges_what_was_trained(tmp_path, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from train.export import merge_dequantized
    from train.quant import is_4bit, load_4bit

    rc = main(_args(tmp_path, "--max-steps", "2", "--load-in-4bit", "--merge", "--lr", "5e-2"))
    assert rc == 0, capsys.readouterr().err
    out = tmp_path / "out"
    m = json.loads((out / "metrics.json").read_text())
    assert m["model"]["weights"] == "nf4" and m["train"]["global_step"] == 2
    assert (out / "adapter.gguf").stat().st_size > 0 and (out / "adapter_model.safetensors").is_file()
    q, _ = load_4bit(tmp_path / "tiny", dtype=torch.float32)
    trained = PeftModel.from_pretrained(q, str(out)).eval()
    assert is_4bit(trained)
    b = [p for n, p in trained.named_parameters() if "lora_B" in n]
    assert b and any(float(p.abs().max()) > 0 for p in b)  # the adapter learned something
    ids = torch.tensor([[1, 5, 9, 20, 30, 44, 60, 101, 102, 7]])
    with torch.no_grad():
        want = trained(input_ids=ids).logits
        merged = AutoModelForCausalLM.from_pretrained(out / "merged", dtype=torch.float32).eval()
        assert not is_4bit(merged) and getattr(merged.config, "quantization_config", None) is None
        got = merged(input_ids=ids).logits
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        # peft's own merge re-quantizes W + delta to NF4: a different model, which --merge must not write
        requant = trained.merge_and_unload()(input_ids=ids).logits
    assert (requant - want).abs().max() > 10 * (got - want).abs().max()
    assert merge_dequantized  # the function --merge uses for a 4-bit base


@needs_nf4
def test_a_gguf_model_trains_in_4bit_with_the_llama_cpp_check_skipped(tmp_path, capsys, caplog):
    """A GGUF source: its converted directory is what gets quantized; the pre-training check
    (full precision vs llama.cpp) is skipped with a warning and recorded, the adapter.gguf and
    Modelfile are written as without 4-bit."""
    pytest.importorskip("llama_cpp")
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[2] / "bench"))
    try:
        from qlora_fidelity import tiny_gguf
    finally:
        sys.path.pop(0)
    from steer_tui.core.models import default_model_path

    gguf = tiny_gguf(tmp_path / "tiny.gguf", default_model_path())
    data = write_trees(tmp_path / "trees", n_tasks=2)
    rc = main(["--data", str(data), "--model", str(gguf), "--out", str(tmp_path / "out"), "--eval-fraction", "0",
               "--no-progress", "--max-steps", "1", "--load-in-4bit"])
    assert rc == 0, capsys.readouterr().err
    m = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert m["model"]["weights"] == "nf4" and "check-model" in m["model"]["check"]["skipped"]
    assert "model check skipped under --load-in-4bit" in caplog.text
    assert (tmp_path / "out" / "adapter.gguf").stat().st_size > 0 and (tmp_path / "out" / "Modelfile").is_file()
