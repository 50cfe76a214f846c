"""adapter.gguf layout on a tiny Llama: llama.cpp names, shapes, metadata, q/k row permutation."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
gguf = pytest.importorskip("gguf")

from tests.train.tiny import tiny_llama  # noqa: E402
from train.config import make_config  # noqa: E402
from train.export import _permute_rows, export_lora_gguf  # noqa: E402
from train.model_setup import build_peft_model  # noqa: E402


def rotary_pairs(w, n_head):
    """Reference for llama.cpp's q/k row order, written out index by index (independent of
    train.export): in each head of dim d, HF keeps the rotary halves [x_0..x_{d/2-1} |
    y_0..y_{d/2-1}]; GGUF interleaves them as pairs x_0 y_0 x_1 y_1 ..."""
    d = w.shape[0] // n_head
    out = np.empty_like(w)
    for h in range(n_head):
        for j in range(d // 2):
            out[h * d + 2 * j] = w[h * d + j]
            out[h * d + 2 * j + 1] = w[h * d + d // 2 + j]
    return out


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
        np.testing.assert_allclose(b, rotary_pairs(q.lora_B["default"].weight.detach().numpy(), 4))
        kb = t[f"blk.{i}.attn_k.weight.lora_b"]
        assert kb.shape == (16, 4)
        np.testing.assert_allclose(kb, rotary_pairs(k.lora_B["default"].weight.detach().numpy(), 2))
        assert not np.allclose(kb, k.lora_B["default"].weight.detach().numpy())
        v = base.model.layers[i].self_attn.v_proj
        np.testing.assert_allclose(t[f"blk.{i}.attn_v.weight.lora_b"], v.lora_B["default"].weight.detach().numpy())


def test_permute_rows_matches_rotary_half_interleave():
    # 1 head of dim 4: HF rows [r0 r1 | r2 r3] (halves) -> GGUF [r0 r2 r1 r3] (pairs)
    w = np.arange(4)[:, None] * np.ones((1, 3))
    assert _permute_rows(w, 1)[:, 0].tolist() == [0, 2, 1, 3]
    # 2 heads of dim 6, by hand: head 0 rows 0..5 -> 0 3 1 4 2 5, head 1 rows 6..11 -> 6 9 7 10 8 11
    assert _permute_rows(np.arange(12)[:, None], 2)[:, 0].tolist() == [0, 3, 1, 4, 2, 5, 6, 9, 7, 10, 8, 11]
    w = np.random.default_rng(0).standard_normal((32, 5))
    for n_head in (1, 2, 4, 8):
        np.testing.assert_array_equal(_permute_rows(w, n_head), rotary_pairs(w, n_head))


# ------------------------------------------------------------------ what the export refuses


def _peft_with(**lora_kw):
    from peft import LoraConfig, get_peft_model

    kw = dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "gate_proj"], lora_dropout=0.0)
    kw.update(lora_kw)
    return get_peft_model(tiny_llama(), LoraConfig(**kw))


@pytest.mark.parametrize(
    "lora_kw,message",
    [
        ({"use_rslora": True}, "rsLoRA/DoRA adapters cannot be expressed"),
        ({"use_dora": True}, "rsLoRA/DoRA adapters cannot be expressed"),
        ({"rank_pattern": {"q_proj": 8}}, "per-module rank/alpha patterns"),
        ({"alpha_pattern": {"v_proj": 2}}, "per-module rank/alpha patterns"),
        ({"target_modules": ["q_proj", "embed_tokens"]}, "LoRA on the embedding 'model.embed_tokens'"),
    ],
    ids=["rslora", "dora", "rank-pattern", "alpha-pattern", "embedding"],
)
def test_adapters_llama_cpp_cannot_apply_are_refused(tmp_path, lora_kw, message):
    from train.export import ExportError

    target = tmp_path / "adapter.gguf"
    with pytest.raises(ExportError, match=message):
        export_lora_gguf(_peft_with(**lora_kw), target)
    assert list(tmp_path.iterdir()) == []  # neither the file nor a temp file


def test_unknown_architecture_and_unmapped_tensor_are_refused(tmp_path):
    from train.export import ExportError

    model = _peft_with()
    with pytest.raises(ExportError, match="gguf-py does not know the architecture 'no-such-arch'"):
        export_lora_gguf(model, tmp_path / "a.gguf", arch="no-such-arch")
    # BERT has no gated FFN: the gate_proj adapter has no llama.cpp name there
    with pytest.raises(ExportError, match=r"no llama.cpp tensor name for 'model.layers.0.mlp.gate_proj.weight' \(architecture 'bert'\)"):
        export_lora_gguf(model, tmp_path / "b.gguf", arch="bert")
    assert list(tmp_path.iterdir()) == []
    export_lora_gguf(model, tmp_path / "c.gguf")  # the same model exports as llama
    assert [p.name for p in tmp_path.iterdir()] == ["c.gguf"]


def test_a_model_without_lora_layers_is_refused():
    from peft import LoraConfig

    from train.export import ExportError, lora_state

    class NoLora:  # the PEFT surface lora_state reads, over a plain model
        active_adapter = "default"
        peft_config = {"default": LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"])}

        def get_base_model(self):
            return tiny_llama()

    with pytest.raises(ExportError, match="the model has no LoRA layers to export"):
        lora_state(NoLora())
