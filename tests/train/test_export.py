"""adapter.gguf layout on a tiny Llama: llama.cpp names, shapes, metadata, q/k row permutation."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
gguf = pytest.importorskip("gguf")

from tests.train.tiny import tiny_llama  # noqa: E402
from train.config import make_config  # noqa: E402
from train.export import _permute_rows, export_lora_gguf  # noqa: E402
from train.trainer import build_peft_model  # noqa: E402


def read(path):
    r = gguf.GGUFReader(str(path))
    meta = {k: f for k, f in r.fields.items()}
    tensors = {t.name: np.array(t.data).reshape([int(x) for x in reversed(t.shape)]) for t in r.tensors}
    return r, meta, tensors


def field(meta, key):
    f = meta[key]
    v = f.parts[f.data[0]]
    return bytes(v).decode() if f.types[0] == gguf.GGUFValueType.STRING else v[0]


def test_lora_gguf_names_shapes_and_metadata(tmp_path):
    cfg = make_config(data=["x"], out="x", lora_r=4, lora_alpha=8)
    model = build_peft_model(tiny_llama(), cfg)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_()
    path = export_lora_gguf(model, tmp_path / "adapter.gguf")
    _, meta, t = read(path)
    assert field(meta, "general.type") == "adapter"
    assert field(meta, "adapter.type") == "lora"
    assert field(meta, "adapter.lora.alpha") == pytest.approx(8.0)
    assert field(meta, "general.architecture") == "llama"
    names = {n.rsplit(".lora_", 1)[0] for n in t}
    expect = {f"blk.{i}.{k}.weight" for i in range(2)
              for k in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")}
    assert names == expect
    base = model.get_base_model()
    for i in range(2):
        q = base.model.layers[i].self_attn.q_proj
        k = base.model.layers[i].self_attn.k_proj
        a, b = t[f"blk.{i}.attn_q.weight.lora_a"], t[f"blk.{i}.attn_q.weight.lora_b"]
        assert a.shape == (4, 32) and b.shape == (32, 4)  # [r, in], [out, r] as llama.cpp expects
        np.testing.assert_allclose(a, q.lora_A["default"].weight.detach().numpy())
        # q rows permuted like convert_hf_to_gguf (4 heads); k with the 2 kv heads
        np.testing.assert_allclose(b, _permute_rows(q.lora_B["default"].weight.detach().numpy(), 4))
        kb = t[f"blk.{i}.attn_k.weight.lora_b"]
        assert kb.shape == (16, 4)
        np.testing.assert_allclose(kb, _permute_rows(k.lora_B["default"].weight.detach().numpy(), 2))
        assert not np.allclose(kb, k.lora_B["default"].weight.detach().numpy())
        v = base.model.layers[i].self_attn.v_proj
        np.testing.assert_allclose(t[f"blk.{i}.attn_v.weight.lora_b"], v.lora_B["default"].weight.detach().numpy())


def test_permute_rows_matches_rotary_half_interleave():
    # 1 head of dim 4: HF rows [r0 r1 | r2 r3] (halves) -> GGUF [r0 r2 r1 r3] (pairs)
    w = np.arange(4)[:, None] * np.ones((1, 3))
    assert _permute_rows(w, 1)[:, 0].tolist() == [0, 2, 1, 3]
