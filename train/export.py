"""Export a PEFT LoRA adapter to llama.cpp's LoRA GGUF format (and optionally a merged model).

The layout follows llama.cpp's ``convert_lora_to_gguf.py``:

* metadata ``general.type = "adapter"``, ``general.architecture``, ``adapter.type = "lora"``,
  ``adapter.lora.alpha``;
* for every adapted base weight ``W`` (HF name mapped to the llama.cpp name with gguf-py's
  ``TensorNameMap``, e.g. ``model.layers.0.self_attn.q_proj.weight`` -> ``blk.0.attn_q.weight``)
  two tensors ``<name>.lora_a`` and ``<name>.lora_b`` with the PEFT shapes kept
  (``lora_a``: ``[r, in]``, ``lora_b``: ``[out, r]``; gguf stores dims reversed, so ggml sees
  ``a.ne = [in, r]``, ``b.ne = [r, out]``, which is what llama.cpp's adapter loader checks);
* llama-family models store Q and K with the rotary halves interleaved differently from HF
  (``convert_hf_to_gguf`` permutes their rows). ``delta = B @ A`` permutes with its rows, so
  only ``lora_b`` of ``q_proj``/``k_proj`` gets the same row permutation.

llama.cpp applies ``W x + (alpha / r) * B A x``, the same scale PEFT uses (no rsLoRA).
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)

#: GGUF architectures whose q/k rows convert_hf_to_gguf permutes for rotary embeddings (the
#: converter's LlamaModel and subclasses that keep ``undo_permute = True``, and Deci)
_PERMUTE_QK = {"llama", "mistral3", "smollm3", "arcee", "granite", "granitemoe", "nanbeige", "deci"}

#: HF ``model_type`` -> GGUF architecture where the names differ (convert_hf_to_gguf writes
#: Mistral as ``llama``, Gemma-3's text model as ``gemma3``...)
_GGUF_ARCH = {
    "mistral": "llama",
    "mixtral": "llama",
    "gemma3_text": "gemma3",
    "qwen2_moe": "qwen2moe",
    "qwen3_moe": "qwen3moe",
    "ministral3": "mistral3",
    "gpt_oss": "gpt-oss",
}


def gguf_arch(model_type: str) -> str:
    """The GGUF architecture name llama.cpp uses for a Hugging Face ``model_type``."""
    return _GGUF_ARCH.get(model_type, model_type)


class ExportError(Exception):
    pass


def _permute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf's LlamaModel.permute on the output (row) dimension."""
    out = w.shape[0]
    return w.reshape(n_head, 2, out // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def lora_state(peft_model, state: dict[str, torch.Tensor] | None = None
               ) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], float, int]:
    """``{hf_weight_name: (A [r, in], B [out, r])}``, alpha and r of the (single) adapter.

    ``state``: the LoRA tensors gathered from the ranks of an FSDP/ZeRO-3 run (peft
    state-dict keys, `train.distributed.gathered_lora_state`), read instead of the model's
    own (sharded) weights."""
    from peft.tuners.lora import LoraLayer

    name = peft_model.active_adapter if isinstance(peft_model.active_adapter, str) else peft_model.active_adapter[0]
    pc = peft_model.peft_config[name]
    if getattr(pc, "use_rslora", False) or getattr(pc, "use_dora", False):
        raise ExportError("rsLoRA/DoRA adapters cannot be expressed in llama.cpp's LoRA format")
    if pc.rank_pattern or pc.alpha_pattern:
        raise ExportError("per-module rank/alpha patterns are not supported by the GGUF export")
    if state is not None:
        out = _lora_pairs(state, name)
        if not out:
            raise ExportError("the gathered state dict has no LoRA weights to export")
        return out, float(pc.lora_alpha), int(pc.r)
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    base = peft_model.get_base_model()
    for mod_name, mod in base.named_modules():
        if isinstance(mod, LoraLayer) and name in getattr(mod, "lora_embedding_A", {}):
            raise ExportError(f"LoRA on the embedding {mod_name!r} is not supported by the GGUF export")
        if isinstance(mod, LoraLayer) and name in mod.lora_A:
            a = mod.lora_A[name].weight.detach().float().cpu()
            b = mod.lora_B[name].weight.detach().float().cpu()
            out[f"{mod_name}.weight"] = (a, b)
    if not out:
        raise ExportError("the model has no LoRA layers to export")
    return out, float(pc.lora_alpha), int(pc.r)


def _lora_pairs(state: dict[str, torch.Tensor], adapter: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{hf_weight_name: (A, B)}`` from peft state-dict keys
    (``base_model.model.<module>.lora_A.<adapter>.weight``, the adapter name kept or not)."""
    out = {}
    pat = re.compile(rf"(?:base_model\.model\.)?(.+)\.lora_A(?:\.{re.escape(adapter)})?\.weight")
    for key, a in state.items():
        if ".lora_embedding_" in key:
            raise ExportError(f"LoRA on the embedding ({key!r}) is not supported by the GGUF export")
        m = pat.fullmatch(key)
        if m is None:
            continue
        b_key = key[: m.end(1)] + key[m.end(1) :].replace("lora_A", "lora_B", 1)
        if b_key not in state:
            raise ExportError(f"the gathered LoRA has {key!r} but no {b_key!r}")
        out[f"{m.group(1)}.weight"] = (a.detach().float().cpu(), state[b_key].detach().float().cpu())
    return out


def export_lora_gguf(peft_model, path: str | os.PathLike[str], *, arch: str | None = None,
                     permute_qk: bool | None = None, state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write ``path`` (llama.cpp LoRA GGUF) from a PEFT model; returns the path.

    ``arch``: the base GGUF's ``general.architecture`` (default: derived from the HF
    ``model_type``). ``permute_qk``: None (default) permutes the q/k rows where the converter
    does (the architecture decides); True/False force it on/off (only for tests that show it
    matters). ``state``: gathered LoRA tensors to write instead of the model's (`lora_state`)."""
    import gguf

    cfg = peft_model.get_base_model().config
    arch = arch or gguf_arch(cfg.model_type)
    try:
        model_arch = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    except StopIteration:
        raise ExportError(f"gguf-py does not know the architecture {arch!r}") from None
    n_blocks = int(cfg.num_hidden_layers)
    tmap = gguf.get_tensor_name_map(model_arch, n_blocks)
    tensors, alpha, r = lora_state(peft_model, state)
    n_head = int(cfg.num_attention_heads)
    n_kv = int(getattr(cfg, "num_key_value_heads", None) or n_head)
    head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // n_head)

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    w = gguf.GGUFWriter(str(tmp), arch)
    w.add_type(gguf.GGUFType.ADAPTER)
    w.add_string(gguf.Keys.Adapter.TYPE, "lora")
    w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    w.add_name("steer-tui LoRA adapter")
    for hf_name, (a, b) in sorted(tensors.items()):
        # strip the "model." prefix variants the map may not know
        gg = tmap.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gg is None:
            raise ExportError(f"no llama.cpp tensor name for {hf_name!r} (architecture {arch!r})")
        b_np = b.numpy()
        if (arch in _PERMUTE_QK) if permute_qk is None else permute_qk:
            if hf_name.endswith("q_proj.weight"):
                b_np = _permute_rows(b_np, n_head)
            elif hf_name.endswith("k_proj.weight"):
                b_np = _permute_rows(b_np, n_kv)
            elif hf_name.endswith("qkv_proj.weight"):  # fused q|k|v rows (Phi-3 style)
                nq, nk = n_head * head_dim, n_kv * head_dim
                b_np = np.concatenate([_permute_rows(b_np[:nq], n_head), _permute_rows(b_np[nq:nq + nk], n_kv),
                                       b_np[nq + nk:]])
        w.add_tensor(f"{gg}.lora_a", np.ascontiguousarray(a.numpy(), dtype=np.float32))
        w.add_tensor(f"{gg}.lora_b", np.ascontiguousarray(b_np, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    os.replace(tmp, path)
    log.info("wrote %s (%d LoRA pairs, r=%d, alpha=%g)", path, len(tensors), r, alpha)
    return path


def merge_and_save(peft_model, tokenizer, out_dir: str | os.PathLike[str]) -> Path:
    """Merged full model (safetensors) + tokenizer in ``out_dir``. Leaves ``peft_model`` intact.

    A 4-bit (QLoRA) base is never merged in place: peft would add the LoRA delta to the
    dequantized weight and quantize the sum to NF4 again, rounding most of the delta away.
    Instead the NF4 weights are dequantized into a plain copy (the base the adapter was trained
    on) and ``W + (alpha / r) B A`` is added in fp32 (`merge_dequantized`)."""
    import copy

    from train.quant import is_4bit

    merged = merge_dequantized(peft_model) if is_4bit(peft_model) else copy.deepcopy(peft_model).merge_and_unload()
    out = Path(out_dir)
    merged.save_pretrained(out, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out


def merge_dequantized(peft_model):
    """A plain model: the 4-bit base dequantized (fp32), plus every LoRA delta ``(alpha / r) B A``."""
    from train.quant import dequantized_model

    tensors, alpha, r = lora_state(peft_model)
    plain = dequantized_model(peft_model.get_base_model(), torch.float32)
    with torch.no_grad():
        for name, (a, b) in tensors.items():
            w = plain.get_parameter(name.replace(".base_layer", ""))
            w.add_((alpha / r) * (b @ a).to(w.device, w.dtype))
    return plain
