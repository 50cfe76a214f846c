"""Training configuration: one dataclass, loadable from TOML, overridable from the CLI.

The defaults were chosen by ``bench/loop.py`` on two rule sets (issues 6 and 14; trials in
docs/loop.md). On the bundled SmolLM2-135M they cut the held-out steer rate by 94% on 277
one-word steers (every guard within 6% of the base model) and by 81% on 229 rewrite steers
of 12-20 tokens (length x0.91, repeated 4-grams x1.07, the rest within 1%). They are

* ``objective = "dpo"``: localized DPO only. An SFT term on the one-word corrections made
  the replacement a favourite word and raised repetition (x1.4-1.9 repeated 4-grams); use
  ``sft+dpo`` (or ``sft``) to also learn from appends and accepted text;
* a strong reference KL: ``kl_weight = 5`` with ``kl_mode = "forward"``, the exact
  KL(reference ‖ policy) over the whole vocabulary at every model-written token of the
  corrected paths (`train.losses.full_reference_kl`). The other direction, ``"full"`` =
  KL(policy ‖ reference), is mode-seeking: at lr 5e-4 it let the adapter sharpen into loops
  (repeated 4-grams x1.58 on rewrite steers, where forward gave x1.07 at the same drop), and
  at lr 2e-4, where it held, the drop on rewrite steers was 47%. ``kl_mode = "token"`` is the
  one-token k3 estimate of the default's KL(reference ‖ policy), from the sampled tokens only
  (`train.losses.reference_kl`); even at weight 4 it let answers get shorter (share ending
  early 0.15 -> 0.33-0.57);
* ``lr = 5e-4`` for 1 epoch, beta 0.1 (sigmoid), LoRA r=16 / alpha=16 / dropout 0.05 on
  every attention and MLP projection, cosine schedule with 10% warm-up, 2 tasks per step.

Naive settings do collapse this model: lr >= 5e-4 with a weak or reverse KL ends answers
early or loops, and localized DPO at lr 5e-4 for 3 epochs without regularisation gave pure repetition.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

# The one list of each choice: the dataclass validation, the CLI's ``choices`` and the
# modules that act on a value all read these.
OBJECTIVES = ("sft", "dpo", "sft+dpo")
#: DPO loss forms (`train.losses.dpo_loss`)
LOSS_TYPES = ("sigmoid", "ipo", "apo_zero", "orpo")
#: sequence layouts (`train.packing.plan_packing`)
PACKINGS = ("tree", "none")
#: reference-KL terms -> the direction of the exact full-vocabulary KL (`train.chunked.kl_rows`):
#: "full" = KL(policy ‖ reference), "forward" = KL(reference ‖ policy), "symmetric" = their sum;
#: "token" (not in the map) = k3 estimate of KL(reference ‖ policy) on the sampled tokens only
FULL_KL_DIRECTIONS = {"full": "reverse", "forward": "forward", "symmetric": "symmetric"}
KL_MODES = (*FULL_KL_DIRECTIONS, "token")
#: ``--attn-impl`` name -> transformers ``attn_implementation`` ("auto" resolves to one of them,
#: `train.model_setup.resolve_attn_impl`)
ATTN_BACKENDS = {"sdpa": "sdpa", "flex": "flex_attention", "eager": "eager"}
ATTN_IMPLS = ("auto", *ATTN_BACKENDS)


class ConfigError(ValueError):
    """A bad configuration value; the message names the key (or --flag) and the problem."""


@dataclass
class TrainConfig:
    # data
    data: list[str] = field(default_factory=list)
    out: str = ""
    model: str | None = None
    objective: str = "dpo"
    eval_fraction: float = 0.1
    model_token_weight: float = 0.0
    accepted_weight: float = 0.5
    chosen_continuation: int = 0
    rejected_tokens: int | None = None
    max_length: int | None = 2048
    # losses
    beta: float = 0.1
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0
    length_normalize: bool = False
    sft_weight: float = 1.0
    dpo_weight: float = 1.0
    rpo_alpha: float = 0.0
    first_token_weight: float = 1.0  # weight of a steer's first divergent token in its DPO span sums
    kl_weight: float = 5.0
    kl_mode: str = "forward"  # see KL_MODES (the direction matters: the module docstring)
    # optimisation
    lr: float = 5e-4
    epochs: float = 1.0
    max_steps: int = -1
    batch_size: int = 2  # tasks (trees) per device per step
    grad_accum: int = 1
    warmup_ratio: float = 0.1
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    scheduler: str = "cosine"
    seed: int = 0
    # LoRA
    lora_r: int = 16
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    lora_mlp: bool = True
    lora_layers: str = "all"  # "all", "last:N" or 0-based "A-B,C"
    init_adapter: str | None = None  # a PEFT adapter dir to go on training (e.g. the previous round's --out)
    # execution
    packing: str = "tree"
    token_budget: int = 4096
    gradient_checkpointing: bool = False
    attn_impl: str = "auto"  # one of ATTN_IMPLS (see train.model_setup.resolve_attn_impl)
    memory_check: bool = True  # estimate the peak memory before training and refuse when it cannot fit
    bf16: bool | None = None  # None: bf16 on a CUDA GPU that supports it, fp32 otherwise
    load_in_4bit: bool = False  # QLoRA: frozen base Linear weights in bitsandbytes NF4 (train.quant)
    save_steps: int = 50
    save_total_limit: int = 2
    logging_steps: int = 1
    resume: bool = False
    merge: bool = False
    export_gguf: bool = True
    trust_remote_code: bool = False
    progress: bool = True

    def validate(self) -> TrainConfig:
        def bad(key: str, msg: str) -> ConfigError:
            return ConfigError(f"--{key.replace('_', '-')}: {msg}")

        for k, allowed in (("objective", OBJECTIVES), ("loss_type", LOSS_TYPES), ("kl_mode", KL_MODES),
                           ("attn_impl", ATTN_IMPLS), ("packing", PACKINGS)):
            if getattr(self, k) not in allowed:
                raise bad(k, f"must be one of {', '.join(allowed)}, not {getattr(self, k)!r}")
        for k in ("lr", "beta", "epochs"):
            if not getattr(self, k) > 0:
                raise bad(k, f"must be > 0, got {getattr(self, k)}")
        for k in ("lora_r", "batch_size", "grad_accum", "token_budget", "save_steps", "logging_steps"):
            if int(getattr(self, k)) < 1:
                raise bad(k, f"must be >= 1, got {getattr(self, k)}")
        for k in ("model_token_weight", "accepted_weight", "sft_weight", "dpo_weight", "rpo_alpha", "kl_weight",
                  "weight_decay", "lora_dropout", "warmup_ratio", "chosen_continuation"):
            if getattr(self, k) < 0:
                raise bad(k, f"must be >= 0, got {getattr(self, k)}")
        if self.first_token_weight <= 0:
            raise bad("first_token_weight", f"must be > 0, got {self.first_token_weight}")
        if not 0 <= self.eval_fraction < 1:
            raise bad("eval_fraction", f"must be in [0, 1), got {self.eval_fraction}")
        if not 0 <= self.label_smoothing < 0.5:
            raise bad("label_smoothing", f"must be in [0, 0.5), got {self.label_smoothing}")
        try:
            parse_layers(self.lora_layers)
        except ValueError as exc:
            raise bad("lora_layers", str(exc)) from None
        if self.rejected_tokens is not None and self.rejected_tokens < 1:
            raise bad("rejected_tokens", f"must be >= 1, got {self.rejected_tokens}")
        return self

    @property
    def full_kl(self) -> bool:
        """Whether the loss has an exact full-vocabulary KL term (``kl_mode`` "full",
        "forward" or "symmetric"; its direction: `kl_direction`)."""
        return self.kl_weight > 0 and self.kl_mode in FULL_KL_DIRECTIONS

    @property
    def kl_direction(self) -> str:
        """The direction of the full-vocabulary KL (`train.chunked.KL_DIRECTIONS`)."""
        return FULL_KL_DIRECTIONS.get(self.kl_mode, "reverse")

    @property
    def token_kl(self) -> bool:
        """Whether the loss has the one-token KL(reference ‖ policy) estimate (``kl_mode = "token"``)."""
        return self.kl_weight > 0 and self.kl_mode == "token"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def parse_layers(spec: str, n_layers: int | None = None) -> list[int] | None:
    """``--lora-layers``: ``"all"`` -> None (every block); ``"last:N"`` -> the last N blocks;
    ``"A-B,C"`` -> those 0-based block indices. With ``n_layers``, indices are checked
    against the model (ValueError with the reason)."""
    spec = str(spec).strip().lower()
    if spec in ("", "all"):
        return None
    if spec.startswith("last:"):
        try:
            n = int(spec[5:])
        except ValueError:
            raise ValueError(f"{spec!r}: 'last:N' needs a whole number N") from None
        if n < 1:
            raise ValueError(f"{spec!r}: 'last:N' needs N >= 1")
        if n_layers is None:
            return []
        if n > n_layers:
            raise ValueError(f"{spec!r}: the model has only {n_layers} layers")
        return list(range(n_layers - n, n_layers))
    out: set[int] = set()
    for part in spec.split(","):
        part = part.strip()
        try:
            if "-" in part:
                a, b = (int(x) for x in part.split("-", 1))
                if b < a:
                    raise ValueError
                out.update(range(a, b + 1))
            else:
                out.add(int(part))
        except ValueError:
            raise ValueError(f"{spec!r}: expected 'all', 'last:N' or 0-based indices like '20-29,5'") from None
    if n_layers is not None and max(out) >= n_layers:
        raise ValueError(f"{spec!r}: layer {max(out)} does not exist; the model has layers 0-{n_layers - 1}")
    return sorted(out)


def field_names() -> set[str]:
    return {f.name for f in fields(TrainConfig)}


def load_toml(path: str | Path) -> dict[str, Any]:
    """Read a TOML config (keys as in TrainConfig, ``-`` or ``_``; an optional ``[train]`` table)."""
    p = Path(path)
    try:
        raw = tomllib.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"--config {str(p)!r} does not exist") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--config {str(p)!r}: not valid TOML: {exc}") from None
    if isinstance(raw.get("train"), dict):
        raw = raw["train"]
    out: dict[str, Any] = {}
    names = field_names()
    for k, v in raw.items():
        key = k.replace("-", "_")
        if key not in names:
            raise ConfigError(f"--config {str(p)!r}: unknown key {k!r}")
        out[key] = v
    if isinstance(out.get("data"), str):
        out["data"] = [out["data"]]
    return out


def make_config(file_values: dict[str, Any] | None = None, **overrides: Any) -> TrainConfig:
    """Defaults <- TOML values <- explicit overrides (None means 'not given')."""
    values: dict[str, Any] = dict(file_values or {})
    values.update({k: v for k, v in overrides.items() if v is not None})
    try:
        cfg = TrainConfig(**values)
    except TypeError as exc:
        raise ConfigError(str(exc)) from None
    return cfg.validate()
