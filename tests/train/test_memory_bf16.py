"""bf16 weights (what steer-train loads on a bf16 GPU): LoRA stays fp32, a step runs under
bf16 autocast, and the frozen layers save no per-forward copy of their weights, unlike fp32
weights under the same autocast (measured with saved-tensor hooks on the CPU)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from tests.train.tiny import tiny_llama  # noqa: E402
from train.config import make_config  # noqa: E402
from train.logprobs import token_logprobs  # noqa: E402
from train.model_setup import build_peft_model, weights_dtype  # noqa: E402


def weight_copies(model) -> int:
    """Saved tensors with the shape of a frozen Linear weight that are not the weight itself."""
    shapes = {tuple(m.weight.shape) for m in model.modules() if isinstance(m, torch.nn.Linear)
              and not m.weight.requires_grad and m.weight.shape[0] != m.weight.shape[1]}
    params = {p.untyped_storage()._cdata for p in model.parameters()}
    found = []

    def pack(t):
        if tuple(t.shape) in shapes or tuple(t.shape[::-1]) in shapes:
            if t.untyped_storage()._cdata not in params:
                found.append(t.untyped_storage()._cdata)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
        out = token_logprobs(model, [[1, 2, 3, 4, 5, 6], [1, 2, 3, 9]], fused=False)
        sum(o.sum() for o in out).backward()
    return len(set(found))


def test_bf16_weights_keep_lora_fp32_and_save_no_weight_copies(tmp_path):
    cfg = make_config(data=["x"], out=str(tmp_path), lora_r=4, lora_dropout=0.0)
    fp32 = build_peft_model(tiny_llama(), cfg)
    bf16 = build_peft_model(tiny_llama().to(torch.bfloat16), cfg)
    trainable = [p for p in bf16.parameters() if p.requires_grad]
    frozen = [p for p in bf16.parameters() if not p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    assert frozen and all(p.dtype == torch.bfloat16 for p in frozen)
    copies_fp32, copies_bf16 = weight_copies(fp32), weight_copies(bf16)
    assert copies_fp32 > 0  # fp32 weights under autocast: a bf16 copy per Linear per forward
    assert copies_bf16 == 0
    grads = [p.grad for p in trainable]
    assert all(g is not None and g.dtype == torch.float32 for g in grads)
    assert any(float(g.abs().sum()) > 0 for g in grads)


def test_weights_dtype_follows_the_device_and_fp32_flag(tmp_path, monkeypatch):
    cfg = make_config(data=["x"], out=str(tmp_path))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert weights_dtype(cfg) is None  # CPU: fp32
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert weights_dtype(cfg) is torch.bfloat16
    assert weights_dtype(make_config(data=["x"], out=str(tmp_path), bf16=False)) is None
