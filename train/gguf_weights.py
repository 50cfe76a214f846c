"""Turn a GGUF's tensors into the weights of the model `train.gguf_config` planned, and write
that model as a safetensors checkpoint.

Tensors are mapped with gguf-py's ``TensorNameMap``, dequantized, un-permuted (llama q/k
rows), un-shifted (Gemma norms ``w + 1``); a model parameter no GGUF tensor fills, or a GGUF
tensor nothing consumes, is an error (`train.gguf_model.Unsupported`): nothing is ever left
at its random initialisation.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator

import numpy as np

from train.gguf_config import Plan
from train.gguf_model import Meta, Unsupported


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of convert_hf_to_gguf's LlamaModel.permute on the rows."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_expected(config) -> tuple[dict[str, tuple[int, ...]], set[str]]:
    """``({hf_name: shape}, tied_names)`` of the model ``config`` describes (built on the meta
    device: no memory, no random init)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    tied = set(getattr(model, "all_tied_weights_keys", {}) or {}) if config.tie_word_embeddings else set()
    if config.tie_word_embeddings and "lm_head.weight" in shapes:
        tied.add("lm_head.weight")
    return shapes, tied


def gguf_to_hf_names(arch: str, n_layer: int, hf_names) -> dict[str, str]:
    """``{gguf_tensor_name: hf_name}`` from gguf-py's name map (the same map convert_hf_to_gguf uses)."""
    import gguf

    model_arch = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    tmap = gguf.get_tensor_name_map(model_arch, n_layer)
    out: dict[str, str] = {}
    for hf in hf_names:
        base, suffix = (hf.rsplit(".", 1) + [""])[:2] if hf.endswith((".weight", ".bias")) else (hf, "")
        g = tmap.get_name(base)
        if g is not None:
            out[f"{g}.{suffix}" if suffix else g] = hf
    return out


def iter_weights(m: Meta, plan: Plan) -> Iterator[tuple[str, np.ndarray]]:
    """``(hf_name, float32 array)`` for every model weight (C-contiguous, writeable, owning its
    memory: the GGUF's mapped pages are released as each tensor is read); raises Unsupported if a
    weight is missing or a GGUF tensor is left over."""
    cfg = plan.config
    shapes, tied = hf_expected(cfg)
    name_map = gguf_to_hf_names(m.arch, cfg.num_hidden_layers, shapes)
    n_head, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    seen: set[str] = set()
    leftover = []
    for t in m.tensor_list:
        if t.name in plan.consumed:
            continue
        hf = name_map.get(t.name)
        if hf is None or hf in tied:
            leftover.append(t.name)
            continue
        w = t.values().reshape([int(x) for x in reversed(t.shape)])
        if plan.permute_qk and (".attn_q." in t.name or ".attn_k." in t.name):
            w = _unpermute(w, n_head if ".attn_q." in t.name else n_kv)
        if plan.norm_shift and t.name.endswith("norm.weight"):
            w = w - np.float32(plan.norm_shift)
        if tuple(w.shape) != shapes[hf]:
            raise Unsupported(f"{m.arch}: tensor {t.name} has shape {tuple(w.shape)}, the model expects {shapes[hf]} for {hf}")
        seen.add(hf)
        plan.weight_types[hf] = t.tensor_type.name
        if hf.endswith("embed_tokens.weight") and "lm_head.weight" in tied:
            plan.weight_types["lm_head.weight"] = t.tensor_type.name  # llama.cpp's output matmul uses it
        w = np.ascontiguousarray(w)
        if not w.flags.writeable:  # an F32 tensor is a view of the read-only map: copy it out
            w = w.copy()
        t.release()
        yield hf, w
    if leftover:
        raise Unsupported(f"{m.arch}: GGUF tensors the training model has no place for: {', '.join(leftover[:6])}"
                          + (f" (+{len(leftover) - 6} more)" if len(leftover) > 6 else ""))
    missing = sorted(set(shapes) - seen - tied)
    if missing:
        raise Unsupported(f"{m.arch}: model weights the GGUF does not provide (would stay random): "
                          f"{', '.join(missing[:6])}" + (f" (+{len(missing) - 6} more)" if len(missing) > 6 else ""))


def write_hf_model(m: Meta, plan: Plan, out: Path, shard_bytes: int = 512 << 20) -> None:
    """config.json + safetensors shards (+ index) of the model in ``out``. A shard is written
    (and its tensors freed) once the next weight would take it past ``shard_bytes``: converting
    holds one shard plus one weight in float32, not the model (bench/convert_memory.py)."""
    import torch
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    plan.config.save_pretrained(out)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    files: list[str] = []
    weight_map: dict[str, str] = {}

    def flush() -> None:
        nonlocal size
        if shards[-1]:
            name = f"model-{len(files) + 1:05d}.safetensors"
            save_file(shards[-1], str(out / name), metadata={"format": "pt"})
            files.append(name)
            for k in shards[-1]:
                weight_map[k] = name
            shards[-1] = {}
            size = 0

    total = 0
    for hf, w in iter_weights(m, plan):
        if size and size + w.nbytes > shard_bytes:
            flush()
        shards[-1][hf] = torch.from_numpy(w)  # shares iter_weights' array: no second copy
        size += w.nbytes
        total += w.nbytes
    flush()
    if len(files) == 1:
        os.replace(out / files[0], out / "model.safetensors")
    else:
        total_files = len(files)
        renamed = {}
        for i, f in enumerate(files):
            new = f"model-{i + 1:05d}-of-{total_files:05d}.safetensors"
            os.replace(out / f, out / new)
            renamed[f] = new
        index = {"metadata": {"total_size": total}, "weight_map": {k: renamed[v] for k, v in weight_map.items()}}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
