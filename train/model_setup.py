"""Make a loaded model ready to train: weight dtype, attention backend, LoRA wrapping.

* `weights_dtype`: bf16 weights on a CUDA GPU that has bf16 (unless ``--fp32``), else fp32;
* `resolve_attn_impl` / `set_attn_impl`: the transformers attention backend for ``--attn-impl``
  (the choices are `train.config.ATTN_IMPLS`);
* `build_peft_model`: LoRA on the blocks ``--lora-layers`` names, trainable parameters in fp32.
"""

from __future__ import annotations

import torch

from train.config import ATTN_BACKENDS, ATTN_IMPLS, ConfigError, TrainConfig, parse_layers


def _softcaps_attention(model) -> bool:
    cfg = getattr(model, "config", None)
    subs = [cfg, getattr(cfg, "text_config", None)]
    return any(getattr(c, "attn_logit_softcapping", None) for c in subs if c is not None)


def resolve_attn_impl(model, requested: str = "auto", device: str | None = None) -> str:
    """The transformers ``attn_implementation`` for ``--attn-impl``.

    ``auto``: ``sdpa`` (on CUDA it runs the memory-efficient kernel with the tree mask; on the
    CPU the fused flash kernel or the math path), except for models that softcap attention
    scores (Gemma-2), which SDPA cannot: ``flex_attention`` on CUDA (a ``score_mod``), else
    ``eager``. ``flex`` needs a backward, which FlexAttention has only on GPUs: refused on the
    CPU with that reason."""
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "auto":
        if _softcaps_attention(model):
            return "flex_attention" if dev.type == "cuda" and _has_flex() else "eager"
        return "sdpa"
    if requested not in ATTN_BACKENDS:
        raise ConfigError(f"--attn-impl: must be one of {', '.join(ATTN_IMPLS)}, not {requested!r}")
    if requested == "flex":
        if not _has_flex():
            raise ConfigError(f"--attn-impl flex: torch {torch.__version__} has no FlexAttention")
        if dev.type != "cuda":
            raise ConfigError(f"--attn-impl flex: FlexAttention has no backward on {dev.type} in torch "
                              f"{torch.__version__} (training needs one); use sdpa or eager")
    if requested == "sdpa" and _softcaps_attention(model):
        raise ConfigError("--attn-impl sdpa: this model softcaps attention scores, which SDPA cannot; "
                          "use eager (or flex on a GPU)")
    return ATTN_BACKENDS[requested]


def _has_flex() -> bool:
    try:
        from torch.nn.attention.flex_attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


def set_attn_impl(model, requested: str = "auto", device: str | None = None) -> str:
    """Switch ``model`` (before peft wraps it) to the resolved attention implementation."""
    name = resolve_attn_impl(model, requested, device)
    if getattr(model.config, "_attn_implementation", None) != name:
        model.set_attn_implementation(name)
    return name


def build_peft_model(model, cfg: TrainConfig):
    from peft import LoraConfig, get_peft_model

    from train.dropout import use_sparse_dropout
    from train.modeling import lora_target_modules

    targets = lora_target_modules(model, mlp=cfg.lora_mlp)
    n_layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    try:
        layers = parse_layers(cfg.lora_layers, n_layers)
    except ValueError as exc:
        raise ConfigError(f"--lora-layers {exc}") from None
    if layers == []:
        raise ConfigError(f"--lora-layers {cfg.lora_layers!r}: cannot tell how many layers {type(model).__name__} has")
    extra = {"layers_to_transform": layers} if layers is not None else {}
    lc = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                    target_modules=targets, bias="none", task_type="CAUSAL_LM", **extra)
    if cfg.load_in_4bit:
        from train.quant import prepare_4bit

        prepare_4bit(model)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    if cfg.init_adapter:
        peft_model = load_init_adapter(model, cfg.init_adapter)
    else:
        peft_model = get_peft_model(model, lc)
    fp32_trainable(peft_model)
    use_sparse_dropout(peft_model)  # the same dropout, drawn cheaper on a CPU
    return peft_model


def load_init_adapter(model, path: str):
    """``--init-adapter DIR``: go on training the LoRA adapter a previous ``steer-train`` run
    (or any PEFT ``save_pretrained``) wrote to DIR, instead of a fresh one. Its own LoraConfig
    (rank, targets, layers) applies; the reference stays the base model (adapter disabled)."""
    from pathlib import Path

    from peft import PeftModel

    d = Path(path)
    if not (d / "adapter_config.json").is_file():
        raise ConfigError(f"--init-adapter {path}: no adapter_config.json there (pass the --out directory of a "
                          "steer-train run, or a PEFT adapter directory)")
    try:
        return PeftModel.from_pretrained(model, str(d), is_trainable=True)
    except (ValueError, KeyError, RuntimeError, OSError) as exc:
        raise ConfigError(f"--init-adapter {path}: cannot load it onto this model: {exc}") from None


def weights_dtype(cfg: TrainConfig):
    """bf16 weights on a CUDA GPU that supports bf16 (unless ``--fp32``): an 8B model takes
    16 GB instead of 32, and under bf16 autocast the frozen Linear layers run on their own
    weights instead of a bf16 copy made (and saved for backward) at every forward. fp32
    elsewhere: CPUs run fp32 (no autocast there)."""
    use = cfg.bf16 if cfg.bf16 is not None else True
    return torch.bfloat16 if use and torch.cuda.is_available() and torch.cuda.is_bf16_supported() else None


def fp32_trainable(model) -> int:
    """Keep the trainable (LoRA) parameters in fp32, whatever the frozen weights' dtype: the
    optimizer updates an fp32 master (a 2e-4 step is below bf16's resolution for weights of
    size ~1). Returns how many tensors were cast."""
    n = 0
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32 and p.is_floating_point():
            p.data = p.data.float()
            n += 1
    return n
