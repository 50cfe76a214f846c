"""``open_engine``: check a model (and adapter) file, then load it with llama.cpp.

The factory is the only module that knows both the engine contract (``engine_base``) and
the concrete llama.cpp backend (``llama_engine``); the backend is imported when a model is
opened, so importing this module never loads llama.cpp.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from steer_tui.core.errors import EngineError
from steer_tui.core.gguf import gguf_metadata
from steer_tui.core.models import ModelNotFound, check_gguf, default_model_path

if TYPE_CHECKING:
    from steer_tui.core.llama_engine import LlamaEngine

__all__ = ["DEFAULT_N_CTX", "MIN_N_CTX", "open_engine"]

#: The smallest context window ``open_engine`` accepts.
MIN_N_CTX = 16
#: Default context window (tokens).
DEFAULT_N_CTX = 4096


def _checked_path(path: str | os.PathLike[str], what: str) -> Path:
    try:
        return check_gguf(path).resolve()
    except ModelNotFound as exc:
        raise EngineError(f"{what}: {exc}") from None


def _check_lora_adapter(adapter_path: Path) -> None:
    meta = gguf_metadata(adapter_path, ("general.type", "adapter.type"))
    kind = meta.get("general.type"), meta.get("adapter.type")
    if kind != ("adapter", "lora"):
        # llama.cpp would accept (or crash on) a whole model passed as an adapter
        raise EngineError(
            f"adapter {str(adapter_path)!r} is not a LoRA adapter GGUF (general.type="
            f"{kind[0]!r}, adapter.type={kind[1]!r}); export one with steer-train"
        )


def open_engine(
    model_path: str | os.PathLike[str] | None = None,
    *,
    n_ctx: int = DEFAULT_N_CTX,
    n_gpu_layers: int = -1,
    adapter: str | os.PathLike[str] | None = None,
    seed: int | None = None,
    n_threads: int | None = None,
    extra_bufts: bool | str | None = None,
) -> LlamaEngine:
    """Load a GGUF model with llama.cpp. ``None`` = the bundled default model.

    A missing, unreadable or non-GGUF file (model or adapter) raises ``EngineError`` naming
    the path before llama.cpp sees it. Loading prints nothing. ``extra_bufts``: see
    ``steer_tui.core.llama_load`` (None = ``$STEER_EXTRA_BUFTS`` or ``"auto"``)."""
    if model_path is None:
        try:
            path = default_model_path()
        except ModelNotFound as exc:
            raise EngineError(str(exc)) from None
    else:
        path = _checked_path(model_path, "model")
    adapter_path = _checked_path(adapter, "adapter") if adapter is not None else None
    if adapter_path is not None:
        _check_lora_adapter(adapter_path)
    if isinstance(n_ctx, bool) or not isinstance(n_ctx, int) or n_ctx < MIN_N_CTX:
        raise EngineError(f"n_ctx must be an integer >= {MIN_N_CTX} (got {n_ctx!r})")
    from steer_tui.core.llama_engine import LlamaEngine  # here, not at the top: loads llama.cpp

    return LlamaEngine(
        path, n_ctx=n_ctx, n_gpu_layers=n_gpu_layers, adapter=adapter_path, seed=seed, n_threads=n_threads,
        extra_bufts=extra_bufts,
    )
