"""The llama.cpp engine (llama-cpp-python), on top of ``BaseEngine``.

We drive llama.cpp below ``Llama.generate``: our own batches (logits requested only for the
rows we need: the last one while generating, every continuation row while scoring), our own
KV-cache bookkeeping (``llama_memory_seq_rm`` to drop what a rollback cut away) and numpy
sampling in ``BaseEngine``. ``Llama(logits_all=False)`` keeps llama.cpp from copying a
full logits matrix per batch. Imported lazily by ``open_engine`` so that the fake engine and
the UI's import time never pay for loading llama.cpp.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

import llama_cpp
from steer_tui.core.engine_base import BaseEngine
from steer_tui.core.errors import EngineError
from steer_tui.core.llama_load import load_llama
from steer_tui.core.store import file_sha256

__all__ = ["LlamaEngine"]


class LlamaEngine(BaseEngine):
    """A GGUF model loaded with llama-cpp-python. Use ``open_engine`` to build one (it checks
    the files first); ``llm`` is the underlying ``llama_cpp.Llama`` for benchmarks."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        n_ctx: int = 4096,
        n_gpu_layers: int = -1,
        adapter: str | os.PathLike[str] | None = None,
        seed: int | None = None,
        n_threads: int | None = None,
        n_batch: int = 512,
        extra_bufts: bool | str | None = None,
    ) -> None:
        super().__init__()
        self.path = str(Path(path).resolve())
        self.name = Path(self.path).name.removesuffix(".gguf")
        kwargs: dict[str, Any] = dict(
            n_ctx=n_ctx,
            n_batch=n_batch,
            n_gpu_layers=n_gpu_layers,
            logits_all=False,
            verbose=False,
        )
        if seed is not None:
            kwargs["seed"] = seed
        if n_threads is not None:
            kwargs["n_threads"] = n_threads
        if adapter is not None:
            kwargs["lora_path"] = str(Path(adapter).resolve())
        try:
            self.llm = load_llama(self.path, extra_bufts=extra_bufts, **kwargs)
        except (ValueError, RuntimeError) as exc:
            what = f"adapter {str(adapter)!r} for model {self.path!r}" if adapter else f"model {self.path!r}"
            raise EngineError(f"llama.cpp could not load {what}: {exc}") from None
        self._ctx = self.llm._ctx
        self._batch = self.llm._batch
        self._n_batch = self.llm.n_batch
        self._vocab = self.llm._model.vocab
        self.n_vocab = int(self.llm.n_vocab())
        # llama.cpp may round the window up (to 256); Llama's own token buffer keeps the size
        # asked for, and _decode writes there: the smaller of the two is the window
        self.n_ctx = min(int(self.llm.n_ctx()), len(self.llm.input_ids))
        self.bos_id = int(self.llm.token_bos())
        self.add_bos = bool(self.llm._model.add_bos_token())
        self.eos_ids = tuple(
            i for i in range(self.n_vocab) if llama_cpp.llama_vocab_is_eog(self._vocab, i)
        ) or (int(self.llm.token_eos()),)
        self._eos_set = frozenset(self.eos_ids)
        self._sha256: str | None = None
        self._adapter_info: dict | None = None
        self._adapter_enabled = adapter is not None
        if adapter is not None:
            apath = str(Path(adapter).resolve())
            self._adapter_info = {"path": apath, "sha256": file_sha256(apath)}
        self._chat_formatter = None

    # ---- metadata ------------------------------------------------------------------------

    @property
    def sha256(self) -> str:
        """sha256 of the GGUF file (computed on first use, ~0.3 s per 100 MB, then cached)."""
        if self._sha256 is None:
            self._sha256 = file_sha256(self.path)
        return self._sha256

    @property
    def adapter(self) -> dict | None:
        """The loaded adapter while it is enabled (what the next evaluation uses), else None."""
        return self._adapter_info if self._adapter_enabled else None

    @property
    def loaded_adapter(self) -> dict | None:
        """The adapter loaded at start, whether or not it is currently enabled."""
        return self._adapter_info

    @property
    def adapter_enabled(self) -> bool:
        """Whether the loaded adapter is on (see ``set_adapter_enabled``)."""
        return self._adapter_enabled

    def set_adapter_enabled(self, enabled: bool) -> None:
        """Switch the loaded LoRA adapter on or off for what is evaluated next (to compare
        base vs adapter at a branch point). The KV cache was computed with the other
        weights, so it is dropped: the next call re-evaluates its whole context."""
        if self._adapter_info is None:
            if enabled:
                raise EngineError("no adapter is loaded (start with --adapter PATH.gguf)")
            return
        enabled = bool(enabled)
        if enabled == self._adapter_enabled:
            return
        with self._lock:
            if enabled:
                arr = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(self.llm._lora_adapter)
                scales = (ctypes.c_float * 1)(self.llm.lora_scale)
                rc = llama_cpp.llama_set_adapters_lora(self._ctx.ctx, arr, 1, scales)
            else:
                rc = llama_cpp.llama_set_adapters_lora(self._ctx.ctx, None, 0, None)
            if rc:
                raise EngineError(f"llama.cpp could not {'enable' if enabled else 'disable'} the adapter (code {rc})")
            self._adapter_enabled = enabled
            self.reset()

    # ---- tokens --------------------------------------------------------------------------

    def _token_bytes_uncached(self, token_id: int) -> bytes:
        size = 64
        while True:
            buf = ctypes.create_string_buffer(size)
            n = llama_cpp.llama_token_to_piece(self._vocab, token_id, buf, size, 0, True)
            if n >= 0:
                return buf.raw[:n]
            size = -n

    def tokenize(self, text: str, *, add_bos: bool = False, special: bool = False) -> list[int]:
        """Token ids of ``text``. ``special=True`` parses control-token text such as
        ``<|im_start|>`` into the control token; otherwise it is plain text."""
        if not text and not add_bos:
            return []
        return list(self.llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=special))

    def render_chat(self, messages: list[dict]) -> str:
        """Render chat messages with the model's own template (GGUF metadata), ending with
        the assistant generation prompt."""
        import jinja2
        from llama_cpp import llama_chat_format

        template = self.llm.metadata.get("tokenizer.chat_template")
        if not template:
            raise EngineError(
                f"model {self.path!r} has no chat template in its metadata; use a raw prompt"
            )
        if self._chat_formatter is None:
            model = self.llm._model
            eos, bos = self.llm.token_eos(), self.llm.token_bos()
            self._chat_formatter = llama_chat_format.Jinja2ChatFormatter(
                template=template,
                eos_token=model.token_get_text(eos) if eos != -1 else "",
                bos_token=model.token_get_text(bos) if bos != -1 else "",
                add_generation_prompt=True,
            )
        try:
            return self._chat_formatter(messages=messages).prompt
        except (jinja2.TemplateError, ValueError, TypeError) as exc:  # raise_exception() raises ValueError
            raise EngineError(f"the model's chat template failed on these messages: {exc}") from None

    # ---- primitives ------------------------------------------------------------------------

    def _decode(self, tokens: Sequence[int], n_past: int, all_logits: bool) -> np.ndarray:
        nv = self.n_vocab
        rows: list[np.ndarray] = []
        last = None
        for i in range(0, len(tokens), self._n_batch):
            chunk = tokens[i : i + self._n_batch]
            self._batch.set_batch(batch=chunk, n_past=n_past + i, logits_all=all_logits)
            try:
                self._ctx.decode(self._batch)
            except RuntimeError as exc:
                # drop whatever the failed batch left and resync our bookkeeping
                self._ctx.kv_cache_seq_rm(-1, n_past, -1)
                raise EngineError(f"llama.cpp failed to evaluate tokens: {exc}") from None
            if all_logits:
                ptr = self._ctx.get_logits()
                rows.append(np.ctypeslib.as_array(ptr, shape=(len(chunk), nv)).copy())
            elif i + self._n_batch >= len(tokens):
                ptr = self._ctx.get_logits_ith(-1)
                last = np.ctypeslib.as_array(ptr, shape=(nv,)).copy()
        llm = self.llm  # keep Llama's own view consistent (only informative for us)
        llm.input_ids[n_past : n_past + len(tokens)] = tokens
        llm.n_tokens = n_past + len(tokens)
        if all_logits:
            return np.concatenate(rows) if len(rows) > 1 else rows[0]
        assert last is not None
        return last

    def _kv_truncate(self, n: int) -> None:
        self._ctx.kv_cache_seq_rm(-1, n, -1)
        self.llm.n_tokens = n

    def close(self) -> None:
        self.llm.close()
