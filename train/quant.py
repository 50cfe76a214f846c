"""QLoRA (``--load-in-4bit``): the frozen base model in bitsandbytes NF4, LoRA on top.

* `require_bnb` refuses in one line when bitsandbytes is missing (naming ``pip install
  bitsandbytes`` and the flag) or cannot run NF4 on the device (it is tried on a 64x64 block);
* `load_4bit` loads a Hugging Face directory (for a GGUF: its converted safetensors
  directory, `train.modeling.convert_gguf`) with ``BitsAndBytesConfig(load_in_4bit=True,
  bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=bf16 (fp32 where bf16 is not supported),
  bnb_4bit_use_double_quant=True)``. Every ``nn.Linear`` but the output layer becomes NF4;
  embeddings, norms and the output layer stay in the compute dtype;
* `prepare_4bit`: the part of ``peft.prepare_model_for_kbit_training`` we want: every base
  parameter frozen. It does *not* upcast the norms and embeddings to fp32 (the bf16 path
  keeps them in bf16 too; RMSNorm already computes in fp32; an fp32 copy of a 128k-vocabulary
  embedding costs 2 GB) and does not switch on gradient checkpointing (``--gradient-checkpointing``
  does that, as without 4-bit);
* `dequantized_model`: a plain model whose weights are the NF4 weights dequantized, i.e. the
  base the adapter was trained on, so ``--merge`` never writes re-quantized (rounded again)
  weights;
* `quantized_bytes`: what a module's NF4 weights and their quantization state take, and
  `nf4_weight_bytes`: what a model's weights would take loaded in 4-bit (the memory check
  suggests QLoRA with it).

The LoRA weights themselves stay plain fp32 tensors: ``adapter.gguf`` exports as without
4-bit and llama.cpp applies it to the GGUF's own weights (docs/training.md, QLoRA, says what
that changes, measured by ``bench/qlora_fidelity.py``).
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import torch

from train.config import ConfigError, TrainConfig

#: bitsandbytes' NF4 block size (one absmax per 64 weights)
NF4_BLOCK = 64
#: bytes per weight of NF4 with double quantization: 4 bits + an 8-bit absmax per block of 64
#: + an fp32 second-level absmax per 256 blocks
NF4_BYTES_PER_WEIGHT = 0.5 + 1 / NF4_BLOCK + 4 / (NF4_BLOCK * 256)

#: fixed bytes per NF4 weight tensor: its 16-value code book, the nested 256-value one (fp32)
#: and the nested offset
NF4_STATE_BYTES = (16 + 256) * 4 + 4

PIP_HINT = "pip install bitsandbytes"


def bnb_problem(device: str | torch.device | None = None) -> str | None:
    """Why ``--load-in-4bit`` cannot run on ``device`` (default: CUDA when there is one, else
    the CPU), in a few words, or None when bitsandbytes runs NF4 there (tried on a 64x64 block)."""
    try:
        import bitsandbytes as bnb
        import bitsandbytes.functional as F
    except ImportError as exc:
        return f"bitsandbytes is not installed ({exc}): `{PIP_HINT}`"
    dev = torch.device(device) if device is not None else default_device()
    try:
        w = torch.linspace(-1, 1, NF4_BLOCK * NF4_BLOCK, device=dev).reshape(NF4_BLOCK, NF4_BLOCK)
        q, state = F.quantize_4bit(w, blocksize=NF4_BLOCK, quant_type="nf4")
        back = F.dequantize_4bit(q, state)
        if not torch.isfinite(back).all() or (back - w).abs().max() > 0.2:
            raise RuntimeError("its NF4 round trip returns wrong values")
    except Exception as exc:
        where = "" if dev.type == "cuda" else ": its 4-bit path needs a CUDA GPU here"
        return (f"bitsandbytes {getattr(bnb, '__version__', '?')} cannot run NF4 on {dev.type} "
                f"({type(exc).__name__}: {exc}){where}")
    return None


def require_bnb(device: str | torch.device | None = None) -> None:
    """`ConfigError` naming the flag and what to do when `bnb_problem` finds one."""
    why = bnb_problem(device)
    if why is not None:
        raise ConfigError(f"--load-in-4bit: {why} (or `pip install 'steer[qlora]'`); or train without --load-in-4bit"
                          if "not installed" in why else f"--load-in-4bit: {why}; or train without --load-in-4bit")


def default_device() -> torch.device:
    """This rank's GPU (``LOCAL_RANK`` under torchrun / accelerate), else the CPU."""
    if torch.cuda.is_available():
        return torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}")
    return torch.device("cpu")


def compute_dtype(cfg: TrainConfig | None = None) -> torch.dtype:
    """bf16 on a CUDA GPU that supports it (unless ``--fp32``), fp32 elsewhere: the dtype
    bitsandbytes dequantizes NF4 weights to for each matmul, and the other weights' dtype."""
    use = cfg.bf16 if cfg is not None and cfg.bf16 is not None else True
    return torch.bfloat16 if use and torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32


def bnb_config(dtype: torch.dtype):
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype,
                              bnb_4bit_use_double_quant=True)


def load_4bit(where: str | Path, *, dtype: torch.dtype, trust_remote_code: bool = False,
              device: str | torch.device | None = None) -> tuple[Any, dict]:
    """``(model, loading_info)``: the Hugging Face directory ``where`` with its Linear layers in
    NF4 on ``device`` (default: this rank's GPU, else the CPU)."""
    from transformers import AutoModelForCausalLM

    dev = torch.device(device) if device is not None else default_device()
    require_bnb(dev)
    return AutoModelForCausalLM.from_pretrained(
        str(where), quantization_config=bnb_config(dtype), dtype=dtype, device_map={"": dev},
        use_safetensors=True, output_loading_info=True, local_files_only=True, trust_remote_code=trust_remote_code)


def is_4bit(model) -> bool:
    """Whether any weight of ``model`` (a PEFT wrapper or a transformers model) is NF4/FP4."""
    return any(type(p).__name__ == "Params4bit" for p in model.parameters())


def prepare_4bit(model):
    """Freeze every base parameter (the LoRA wrapping adds the trainable ones)."""
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def quantized_bytes(model) -> int:
    """Bytes of the 4-bit quantization state of ``model``'s weights that are not parameters
    or buffers (absmax, the nested absmax and code book), which ``model.parameters()`` misses."""
    total, seen = 0, set()
    for p in model.parameters():
        qs = getattr(p, "quant_state", None)
        for t in _state_tensors(qs) if qs is not None else ():
            key = (t.device, t.untyped_storage().data_ptr())  # the code books are shared
            if key not in seen:
                seen.add(key)
                total += t.untyped_storage().nbytes()
    return total


def _state_tensors(qs) -> list[torch.Tensor]:
    out = [t for t in (getattr(qs, "absmax", None), getattr(qs, "code", None), getattr(qs, "offset", None))
           if isinstance(t, torch.Tensor)]
    nested = getattr(qs, "state2", None)
    if nested is not None:
        out += [t for t in (getattr(nested, "absmax", None), getattr(nested, "code", None))
                if isinstance(t, torch.Tensor)]
    return out


def quantizable(model) -> list[tuple[str, torch.nn.Module]]:
    """The ``nn.Linear`` layers ``load_4bit`` turns into NF4: all but the output layer."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    return [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m is not head
            and m.weight.numel() % NF4_BLOCK == 0]


def nf4_weight_bytes(model, dtype: torch.dtype) -> int:
    """What ``model``'s weights would take loaded with ``--load-in-4bit``: the quantizable
    Linear weights in NF4 (+ state), everything else in ``dtype``. Parameters shared by several
    modules (tied embeddings) count once."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    q_ids = {id(m.weight) for _, m in quantizable(base)}
    total, seen = 0, set()
    for p in list(base.parameters()) + list(base.buffers()):
        if id(p) in seen:
            continue
        seen.add(id(p))
        if id(p) in q_ids and type(p).__name__ != "Params4bit":
            total += int(p.numel() * NF4_BYTES_PER_WEIGHT) + NF4_STATE_BYTES
        elif type(p).__name__ == "Params4bit":
            total += p.numel() * p.element_size()
        elif p.is_floating_point():
            total += p.numel() * torch.empty(0, dtype=dtype).element_size()
        else:
            total += p.numel() * p.element_size()
    return total + (quantized_bytes(base) if is_4bit(base) else 0)


def dequantized_state(model, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """``model``'s state dict (a 4-bit transformers model, maybe with LoRA layers injected: their
    ``lora_*`` weights are left out and ``base_layer`` names unwrapped) with every NF4 weight
    dequantized to ``dtype`` and the quantization state entries left out."""
    import bitsandbytes.functional as F

    out: dict[str, torch.Tensor] = {}
    quant: dict[str, torch.Tensor] = {}
    for name, mod in model.named_modules():
        w = getattr(mod, "weight", None)
        if type(w).__name__ == "Params4bit":
            quant[f"{name}.weight"] = F.dequantize_4bit(w.data, w.quant_state).to(dtype)
    for k, v in model.state_dict().items():
        stem = k.split(".weight.", 1)[0] + ".weight" if ".weight." in k else None
        if stem in quant or ".lora_" in k:  # absmax / quant_map / nested_* of a 4-bit weight; LoRA
            continue
        out[k.replace(".base_layer.", ".")] = quant.get(k, v.to(dtype) if v.is_floating_point() else v)
    return out


def dequantized_model(model, dtype: torch.dtype = torch.float32):
    """A plain transformers model (no bitsandbytes layers, no ``quantization_config``) whose
    weights are ``model``'s with the NF4 ones dequantized: the base the adapter was trained on."""
    from transformers import AutoModelForCausalLM

    cfg = copy.deepcopy(model.config)
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(cfg, attr):
            delattr(cfg, attr)
    state = dequantized_state(model, dtype)
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    missing, unexpected = plain.load_state_dict(state, strict=False, assign=True)
    tied = {k for k in missing if k.endswith("lm_head.weight")} if getattr(cfg, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise RuntimeError(f"dequantized state does not match the model: missing {sorted(set(missing) - tied)[:5]}, "
                           f"unexpected {sorted(unexpected)[:5]}")
    for name, buf in list(plain.named_buffers()):
        if buf.is_meta:  # not in the state dict (rotary inv_freq...): the source model's own
            mod, _, leaf = name.rpartition(".")
            src = model.get_buffer(name)
            plain.get_submodule(mod).register_buffer(leaf, src.detach().clone(), persistent=False)
    plain.tie_weights()
    return plain.eval()
