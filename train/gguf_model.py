"""Read a GGUF into the Hugging Face model that computes what llama.cpp computes from it.

transformers' own GGUF loader (``from_pretrained(dir, gguf_file=...)``) maps a handful of
metadata keys and silently drops the rest: llama3 rope scaling (the ``rope_freqs`` tensor),
Gemma's attention scale, Gemma-3's per-layer rope, Phi-3's partial rotary and LongRoPE
factors, Qwen3's head size... and it loads MoE GGUFs as dense models with random MLPs. A
training run on such a model trains *another* model than the one llama.cpp runs.

This module therefore builds the config itself, architecture by architecture, from what
**llama.cpp's own loader reads** for that architecture (``src/models/<arch>.cpp`` of the
vendored llama.cpp, ``load_arch_hparams`` and the graph): every value that changes the
computation is either restored or the model is refused with one line naming the architecture
and the missing feature (:class:`Unsupported`). Tensors are mapped with gguf-py's
``TensorNameMap``, dequantized, un-permuted (llama q/k rows), un-shifted (Gemma norms
``w + 1``); a model parameter no GGUF tensor fills, or a GGUF tensor nothing consumes, is an
error: nothing is ever left at its random initialisation.

Supported: ``llama`` (Llama 1-3.x, Mistral/Mixtral-free, SmolLM, incl. llama3 ``rope_freqs``,
linear/YaRN/LongRoPE scaling and biases), ``qwen2``, ``qwen3``, ``gemma2``, ``gemma3``,
``phi3``. Mixture-of-experts GGUFs (experts in ``*_exps`` tensors) are refused by name.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

log = logging.getLogger(__name__)

#: bump when the conversion changes: cached conversions of an older loader are redone
LOADER_VERSION = 2

#: GGUF architecture -> transformers class that runs it
SUPPORTED = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gemma3": "Gemma3ForCausalLM",
    "phi3": "Phi3ForCausalLM",
}

#: GGUF architectures whose q/k rows convert_hf_to_gguf permutes (rotary pairs interleaved)
PERMUTED_QK = {"llama"}

#: llama.cpp names of architectures that are mixtures of experts (refused by name even before
#: looking at tensors)
MOE_ARCHS = {
    "qwen2moe", "qwen3moe", "qwen3next", "deepseek", "deepseek2", "dbrx", "olmoe", "phimoe", "granitemoe",
    "gpt-oss", "llama4", "mixtral", "arctic", "jamba", "minimax-m2", "glm4moe", "ernie4_5-moe", "hunyuan-moe",
    "bailingmoe", "bailingmoe2", "dots1", "grok", "lfm2moe", "afmoe", "mistral4", "smallthinker", "grovemoe",
}


class Unsupported(Exception):
    """This GGUF cannot be trained faithfully; ``str()`` is one line naming why."""


# ---------------------------------------------------------------------------- metadata


_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_BIG_ARRAY = 4096  # longer arrays (token lists, merges) are skipped, their bytes only hashed


class Tensor:
    """One tensor of a GGUF: ``name``, ``shape`` (ggml order, ``ne0`` first), ``tensor_type``
    (gguf.GGMLQuantizationType) and its raw bytes, rows last (``raw``)."""

    def __init__(self, meta: "Meta", name: str, ne: list[int], ttype: int, offset: int):
        from gguf import GGMLQuantizationType

        self.meta, self.name, self.shape, self.offset = meta, name, ne, offset
        self.tensor_type = GGMLQuantizationType(ttype)

    @property
    def raw(self) -> np.ndarray:
        from gguf import GGML_QUANT_SIZES

        block, nbytes = GGML_QUANT_SIZES[self.tensor_type]
        row = self.shape[0] // block * nbytes
        rows = [int(x) for x in reversed(self.shape[1:])]
        n = row * int(np.prod(rows or [1]))
        start = self.meta.data_offset + self.offset
        return np.frombuffer(self.meta.buf, dtype=np.uint8, count=n, offset=start).reshape(*rows, row)

    def release(self) -> None:
        """Unmap this tensor's pages from the process (they stay in the page cache; a later read
        maps them again): converting a GGUF then holds about one tensor of the file resident,
        not all of it."""
        import mmap

        if not hasattr(mmap, "MADV_DONTNEED"):  # pragma: no cover - not Linux/macOS
            return
        start = self.meta.data_offset + self.offset
        page = start // mmap.PAGESIZE * mmap.PAGESIZE
        self.meta.buf.madvise(mmap.MADV_DONTNEED, page, start + self.raw.nbytes - page)

    def values(self) -> np.ndarray:
        """Dequantized float32 values, shaped ``reversed(ne)`` (rows first)."""
        from gguf.quants import dequantize

        return np.asarray(dequantize(self.raw, self.tensor_type), dtype=np.float32)


class Meta:
    """The metadata and tensor directory of one GGUF, read straight from the file (gguf-py's
    GGUFReader parses every token string through numpy views: ~10 s for a 49k vocabulary,
    minutes for 128k+merges). Tensor bytes are read lazily from a memory map."""

    def __init__(self, path: str | os.PathLike[str]):
        import mmap
        import struct

        self.path = str(path)
        with open(self.path, "rb") as fh:
            self.buf = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        b = self.buf
        if b[:4] != b"GGUF":
            raise ValueError(f"{self.path} is not a GGUF file")
        version, n_tensors, n_kv = struct.unpack_from("<IQQ", b, 4)
        if version < 2:
            raise ValueError(f"{self.path}: GGUF version {version} is too old")
        pos = 24
        self.kv: dict[str, Any] = {}
        self.kv_bytes: dict[str, tuple[int, int]] = {}  # key -> (start, end) of its raw entry

        def string(p: int) -> tuple[str, int]:
            (n,) = struct.unpack_from("<Q", b, p)
            return b[p + 8:p + 8 + n].decode("utf-8", errors="replace"), p + 8 + n

        def value(t: int, p: int) -> tuple[Any, int]:
            if t in _SCALAR:
                fmt = _SCALAR[t]
                return struct.unpack_from(fmt, b, p)[0], p + struct.calcsize(fmt)
            if t == 8:
                return string(p)
            if t == 9:
                et, n = struct.unpack_from("<IQ", b, p)
                p += 12
                if et in _SCALAR and et != 7:
                    size = struct.calcsize(_SCALAR[et])
                    if n > _BIG_ARRAY:
                        return None, p + n * size
                    return list(struct.unpack_from(f"<{n}{_SCALAR[et][1]}", b, p)), p + n * size
                out = [] if n <= _BIG_ARRAY else None
                for _ in range(n):
                    v, p = value(et, p)
                    if out is not None:
                        out.append(v)
                return out, p
            raise ValueError(f"{self.path}: unknown GGUF value type {t}")

        for _ in range(n_kv):
            start = pos
            key, pos = string(pos)
            (vt,) = struct.unpack_from("<I", b, pos)
            val, pos = value(vt, pos + 4)
            self.kv_bytes[key] = (start, pos)
            if val is not None:
                self.kv[key] = val
        infos = []
        for _ in range(n_tensors):
            name, pos = string(pos)
            (nd,) = struct.unpack_from("<I", b, pos)
            ne = list(struct.unpack_from(f"<{nd}Q", b, pos + 4))
            pos += 4 + 8 * nd
            ttype, off = struct.unpack_from("<IQ", b, pos)
            pos += 12
            infos.append((name, ne, ttype, off))
        align = int(self.kv.get("general.alignment", 32))
        self.data_offset = -(-pos // align) * align
        self.arch: str = str(self.kv.get("general.architecture", ""))
        self.tensor_list = [Tensor(self, *i) for i in infos]
        self.tensors = {t.name: t for t in self.tensor_list}

    def get(self, key: str, default: Any = None) -> Any:
        """``{arch}.{key}``."""
        return self.kv.get(f"{self.arch}.{key}", default)

    def has(self, key: str) -> bool:
        return f"{self.arch}.{key}" in self.kv

    def uniform(self, key: str, default: Any = None, what: str | None = None) -> Any:
        """A per-model value that llama.cpp also accepts per layer (arrays): refuse non-uniform arrays."""
        v = self.get(key, default)
        if isinstance(v, list):
            if not v or any(x != v[0] for x in v):
                raise Unsupported(f"{self.arch}: per-layer {what or key} ({v[:8]}...) is not supported")
            v = v[0]
        return v

    def tensor_type(self, name: str) -> str | None:
        t = self.tensors.get(name)
        return t.tensor_type.name if t is not None else None

    def file_type(self) -> str:
        """The most common weight type of the 2-D tensors (``"Q4_K"``, ``"F32"``...)."""
        from collections import Counter

        c = Counter(t.tensor_type.name for t in self.tensor_list if len(t.shape) >= 2)
        return c.most_common(1)[0][0] if c else "F32"

    def tokenizer_digest(self, salt: str = "") -> str:
        """sha256 over the raw bytes of every ``tokenizer.*`` entry but the chat template (plus ``salt``)."""
        import hashlib

        h = hashlib.sha256(salt.encode())
        for key in sorted(self.kv_bytes):
            if key.startswith("tokenizer.") and not key.startswith("tokenizer.chat_template"):
                s, e = self.kv_bytes[key]
                h.update(self.buf[s:e])
        return h.hexdigest()


_metas: dict[tuple, Meta] = {}


def read_meta(path) -> Meta:
    """:class:`Meta` of ``path``, remembered while the file is unchanged (a few per process)."""
    st = os.stat(path)
    key = (os.path.realpath(path), st.st_size, st.st_mtime_ns)
    if key not in _metas:
        if len(_metas) >= 8:
            _metas.pop(next(iter(_metas)))
        _metas[key] = Meta(path)
    return _metas[key]


# ---------------------------------------------------------------------------- config


@dataclass
class Plan:
    """What :func:`build_config` decided: the HF config and how to turn tensors into weights."""

    arch: str
    config: Any
    permute_qk: bool = False
    norm_shift: float = 0.0
    consumed: set[str] = field(default_factory=set)  # GGUF tensors that went into the config
    notes: list[str] = field(default_factory=list)   # what was restored, for the log / check-model
    weight_types: dict[str, str] = field(default_factory=dict)  # hf weight -> GGUF tensor type (Q4_K, F32...)


def _refuse_moe(m: Meta) -> None:
    n_expert = int(m.get("expert_count", 0) or 0)
    exps = [n for n in m.tensors if "_exps" in n or ".ffn_gate_inp." in n]
    if m.arch in MOE_ARCHS or n_expert or exps:
        what = f"{n_expert} experts" if n_expert else f"expert tensors such as {exps[0]}" if exps else "experts"
        style = " (Mixtral-style)" if m.arch == "llama" else ""
        raise Unsupported(
            f"{m.arch}{style}: mixture-of-experts models ({what}) are not supported: steer-train trains dense models "
            f"only (its LoRA export covers dense layers, and loading the experts as a dense model would leave "
            f"random weights); use a dense model")


def _rope_parameters(m: Meta, plan: Plan, *, head_dim: int, n_rot: int, base: float, ctx: int) -> dict:
    """HF ``rope_parameters`` equal to llama.cpp's rope for the (full-attention) layers."""
    typ = str(m.get("rope.scaling.type", "linear") or "linear")
    factor = float(m.get("rope.scaling.factor", 0.0) or m.get("rope.scale_linear", 0.0) or 0.0)
    freq_scale = 1.0 if factor == 0.0 or typ == "none" else 1.0 / factor
    attn_factor = float(m.get("rope.scaling.attn_factor", 1.0) or 1.0)
    orig = int(m.get("rope.scaling.original_context_length", 0) or ctx)
    p: dict[str, Any] = {"rope_type": "default", "rope_theta": float(base)}
    if n_rot != head_dim:
        p["partial_rotary_factor"] = n_rot / head_dim

    freqs = m.tensors.get("rope_freqs.weight")
    long_t, short_t = m.tensors.get("rope_factors_long.weight"), m.tensors.get("rope_factors_short.weight")
    # which tensors llama.cpp uses: rope_freqs always when present; long/short for phi3, and for
    # llama only with rope.scaling.type = longrope
    uses_longshort = (long_t is not None or short_t is not None) and (m.arch == "phi3" or typ == "longrope")
    if freqs is not None and not (m.arch == "llama" and typ == "longrope"):
        plan.consumed.add("rope_freqs.weight")
        if typ == "yarn" or freq_scale != 1.0 or attn_factor != 1.0:
            raise Unsupported(f"{m.arch}: rope_freqs combined with {typ} rope scaling (factor {factor}) is not supported")
        ff = freqs.values().astype(np.float64).reshape(-1)
        if ff.size != n_rot // 2:
            raise Unsupported(f"{m.arch}: rope_freqs has {ff.size} factors, expected {n_rot // 2}")
        p.update(_llama3_or_longrope(ff, base=base, n_rot=n_rot, ctx=ctx))
        plan.notes.append(f"rope frequency factors restored from rope_freqs ({p['rope_type']})")
        return p
    if uses_longshort:
        plan.consumed.update(n for n in ("rope_factors_long.weight", "rope_factors_short.weight") if n in m.tensors)
        if long_t is None or short_t is None:
            raise Unsupported(f"{m.arch}: LongRoPE needs both rope_factors_long and rope_factors_short")
        if freq_scale != 1.0 or typ == "yarn":
            raise Unsupported(f"{m.arch}: LongRoPE combined with {typ} scaling (factor {factor}) is not supported")
        lf = long_t.values().astype(np.float64).reshape(-1).tolist()
        sf = short_t.values().astype(np.float64).reshape(-1).tolist()
        if len(lf) != n_rot // 2 or len(sf) != n_rot // 2:
            raise Unsupported(f"{m.arch}: LongRoPE factors have {len(lf)}/{len(sf)} entries, expected {n_rot // 2}")
        p.update(rope_type="longrope", long_factor=lf, short_factor=sf, original_max_position_embeddings=orig,
                 attention_factor=attn_factor, factor=max(ctx / orig, 1.0))
        plan.notes.append(f"LongRoPE restored (short factors up to {orig} tokens of context, "
                          f"attention factor {attn_factor:.4f})")
        return p
    for n in ("rope_factors_long.weight", "rope_factors_short.weight"):
        if n in m.tensors:  # present but unused by llama.cpp for this arch/type
            plan.consumed.add(n)
    if typ in ("none", "linear"):
        if attn_factor != 1.0:
            raise Unsupported(f"{m.arch}: rope attention factor {attn_factor} without YaRN/LongRoPE is not supported")
        if freq_scale != 1.0:
            p.update(rope_type="linear", factor=1.0 / freq_scale)
            plan.notes.append(f"linear rope scaling x{1.0 / freq_scale:g} restored")
        return p
    if typ == "yarn":
        if factor <= 1.0:
            raise Unsupported(f"{m.arch}: YaRN with factor {factor} <= 1 is not supported")
        mscale = 0.1 * math.log(factor) + 1.0
        # llama.cpp: cos/sin scaled by get_mscale(factor) * rope.scaling.attn_factor (llama-context.cpp
        # cancels ggml's own (1 + 0.1 ln factor)); beta_fast/slow are llama.cpp's defaults (32/1):
        # the qwen2/llama/... loaders do not read the yarn_beta_* keys
        p.update(rope_type="yarn", factor=factor, original_max_position_embeddings=orig,
                 attention_factor=mscale * attn_factor, beta_fast=32.0, beta_slow=1.0, truncate=True)
        plan.notes.append(f"YaRN x{factor:g} from {orig} tokens restored")
        return p
    raise Unsupported(f"{m.arch}: rope scaling type {typ!r} is not supported")


def _llama3_or_longrope(ff: np.ndarray, *, base: float, n_rot: int, ctx: int) -> dict:
    """Rope parameters whose frequencies are ``base^(-2i/n) / ff[i]``: llama3 when a standard
    llama3 parameter set reproduces ``ff`` exactly, else an equivalent LongRoPE with
    ``short = long = ff`` (always exact)."""
    inv = base ** (-np.arange(0, n_rot, 2, dtype=np.float64) / n_rot)
    wavelen = 2 * math.pi / inv
    factor = float(ff.max())
    for lo, hi, old in ((1.0, 4.0, 8192), (1.0, 4.0, 4096), (1.0, 4.0, 32768)):
        low_wl, high_wl = old / lo, old / hi
        smooth = (old / wavelen - lo) / (hi - lo)
        want = np.where(wavelen < high_wl, 1.0,
                        np.where(wavelen > low_wl, factor, 1.0 / ((1 - smooth) / factor + smooth)))
        if np.allclose(want, ff, rtol=2e-6, atol=0):
            return {"rope_type": "llama3", "factor": factor, "low_freq_factor": lo, "high_freq_factor": hi,
                    "original_max_position_embeddings": old}
    return {"rope_type": "longrope", "short_factor": ff.tolist(), "long_factor": ff.tolist(),
            "original_max_position_embeddings": ctx, "attention_factor": 1.0, "factor": 1.0}


def _swa_layers(m: Meta, n_layer: int, default_pattern: int) -> list[bool]:
    """llama.cpp's ``load_swa_pattern``: an array of per-layer flags, or a period ``n`` (layer
    ``il`` is SWA when ``il % n < n - 1``)."""
    v = m.get("attention.sliding_window_pattern")
    if isinstance(v, list):
        if len(v) < n_layer:
            raise Unsupported(f"{m.arch}: sliding_window_pattern has {len(v)} entries for {n_layer} layers")
        return [bool(x) for x in v[:n_layer]]
    n = int(v) if v is not None else default_pattern
    return [n == 0 or (il % n < n - 1) for il in range(n_layer)]


def build_config(m: Meta) -> Plan:
    """The HF config that computes what llama.cpp computes from ``m``; :class:`Unsupported` if
    something llama.cpp does for this architecture has no HF counterpart here."""
    from transformers import AutoConfig

    if not m.arch:
        raise Unsupported("the GGUF has no general.architecture")
    _refuse_moe(m)
    if m.arch not in SUPPORTED:
        raise Unsupported(
            f"{m.arch}: architecture not supported by steer-train's GGUF loader (supported: {', '.join(SUPPORTED)}); "
            f"pass the original Hugging Face model directory with --model if you trust it matches")
    a = m.arch
    plan = Plan(arch=a, config=None)
    if m.get("attention.causal", True) is False:
        raise Unsupported(f"{a}: non-causal attention is not supported")
    if int(m.get("nextn_predict_layers", 0) or 0):
        raise Unsupported(f"{a}: multi-token-prediction layers are not supported")
    n_embd = int(m.get("embedding_length"))
    if int(m.get("embedding_length_out", n_embd) or n_embd) != n_embd:
        raise Unsupported(f"{a}: embedding_length_out != embedding_length is not supported")
    n_layer = int(m.get("block_count"))
    n_head = int(m.uniform("attention.head_count", what="attention head count"))
    n_head_kv = int(m.uniform("attention.head_count_kv", n_head, what="kv head count"))
    n_ff = int(m.uniform("feed_forward_length", what="feed_forward_length"))
    head_k = int(m.get("attention.key_length", n_embd // n_head))
    head_v = int(m.get("attention.value_length", n_embd // n_head))
    if head_k != head_v:
        raise Unsupported(f"{a}: key length {head_k} != value length {head_v} is not supported")
    n_rot = int(m.get("rope.dimension_count", head_k))
    for k in ("attention.key_length_swa", "attention.value_length_swa", "rope.dimension_count_swa"):
        if m.has(k) and int(m.get(k)) != (n_rot if "rope" in k else head_k):
            raise Unsupported(f"{a}: a different {k} on sliding-window layers is not supported")
    ctx = int(m.get("context_length", 2048))
    eps = float(m.get("attention.layer_norm_rms_epsilon", 1e-6))
    base = float(m.get("rope.freq_base", 10000.0) or 10000.0)
    if n_rot != head_k and a != "phi3":
        raise Unsupported(f"{a}: partial rotary embeddings ({n_rot} of {head_k} dims) are not supported for {a}")
    if n_rot > head_k or n_rot % 2:
        raise Unsupported(f"{a}: rope dimension count {n_rot} for head size {head_k} is not supported")

    emb = m.tensors.get("token_embd.weight")
    if emb is None:
        raise Unsupported(f"{a}: no token_embd.weight tensor")
    n_vocab = int(emb.shape[-1])
    tied = "output.weight" not in m.tensors
    has = lambda part: any(n.endswith(part) for n in m.tensors)  # noqa: E731
    rope = _rope_parameters(m, plan, head_dim=head_k, n_rot=n_rot, base=base, ctx=ctx)

    kw: dict[str, Any] = dict(
        vocab_size=n_vocab, hidden_size=n_embd, intermediate_size=n_ff, num_hidden_layers=n_layer,
        num_attention_heads=n_head, num_key_value_heads=n_head_kv, max_position_embeddings=ctx,
        rms_norm_eps=eps, tie_word_embeddings=tied, rope_parameters=rope,
    )
    for tk, ck in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"), ("padding_token_id", "pad_token_id")):
        if f"tokenizer.ggml.{tk}" in m.kv:
            kw[ck] = int(m.kv[f"tokenizer.ggml.{tk}"])

    if a == "llama":
        plan.permute_qk = True
        kw.update(model_type="llama", head_dim=head_k,
                  attention_bias=has(".attn_q.bias") or has(".attn_k.bias") or has(".attn_v.bias") or has(".attn_output.bias"),
                  mlp_bias=has(".ffn_up.bias") or has(".ffn_gate.bias") or has(".ffn_down.bias"))
    elif a == "qwen2":
        if head_k != n_embd // n_head:
            raise Unsupported(f"{a}: head size {head_k} != hidden/heads {n_embd // n_head} is not supported")
        kw.update(model_type="qwen2", use_sliding_window=False, sliding_window=None,
                  layer_types=["full_attention"] * n_layer)
    elif a == "qwen3":
        kw.update(model_type="qwen3", head_dim=head_k, attention_bias=has(".attn_q.bias"), use_sliding_window=False,
                  sliding_window=None, layer_types=["full_attention"] * n_layer)
    elif a == "phi3":
        if head_k != n_embd // n_head:
            raise Unsupported(f"{a}: head size {head_k} != hidden/heads {n_embd // n_head} is not supported")
        # llama.cpp disables Phi-3's sliding window (src/models/phi3.cpp), so do we
        if int(m.get("attention.sliding_window", 0) or 0):
            plan.notes.append("sliding window off, as llama.cpp runs Phi-3")
        kw.update(model_type="phi3", sliding_window=None, original_max_position_embeddings=int(
            rope.get("original_max_position_embeddings", ctx)))
        kw["rope_parameters"] = dict(rope)
        if n_rot != head_k:
            plan.notes.append(f"partial rotary {n_rot}/{head_k} restored")
    elif a in ("gemma2", "gemma3"):
        plan.norm_shift = 1.0
        # llama.cpp: Q scaled by 1/sqrt(head size), except the 27B models (n_embd/n_head)
        big = (a == "gemma2" and n_layer == 46) or (a == "gemma3" and n_layer == 62)
        qpas = (n_embd // n_head) if big else head_k
        kw.update(head_dim=head_k, query_pre_attn_scalar=qpas, attention_bias=False,
                  hidden_activation="gelu_pytorch_tanh")
        plan.notes.append(f"query_pre_attn_scalar {qpas}")
        if a == "gemma2":
            swa = _swa_layers(m, n_layer, 2)
            base_swa = float(m.get("rope.freq_base_swa", base) or base)
            if base_swa != base:
                raise Unsupported(f"{a}: a different rope base on sliding-window layers is not supported for gemma2")
            window = int(m.get("attention.sliding_window", 4096) or 4096)
            kw.update(model_type="gemma2", sliding_window=window,
                      layer_types=["sliding_attention" if s else "full_attention" for s in swa],
                      attn_logit_softcapping=float(m.get("attn_logit_softcapping", 50.0)),
                      final_logit_softcapping=float(m.get("final_logit_softcapping", 30.0)))
            plan.notes.append(f"sliding window {window}, soft-capping {kw['attn_logit_softcapping']:g}/"
                              f"{kw['final_logit_softcapping']:g}")
        else:
            window = int(m.get("attention.sliding_window", 0) or 0)
            swa = _swa_layers(m, n_layer, 6) if window > 0 else [False] * n_layer
            base_swa = float(m.get("rope.freq_base_swa", 10000.0) or 10000.0)
            final_cap = float(m.get("final_logit_softcapping", 0.0) or 0.0)
            kw.update(model_type="gemma3_text", sliding_window=window or None,
                      layer_types=["sliding_attention" if s else "full_attention" for s in swa],
                      final_logit_softcapping=final_cap or None, attn_logit_softcapping=None,
                      rope_parameters={"full_attention": rope,
                                       "sliding_attention": {"rope_type": "default", "rope_theta": base_swa}})
            plan.notes.append(f"sliding window {window} on {sum(swa)}/{n_layer} layers (local rope base {base_swa:g}), "
                              f"global rope {rope['rope_type']}")
    model_type = kw.pop("model_type")
    try:
        plan.config = AutoConfig.for_model(model_type, **kw)
    except Exception as exc:
        raise Unsupported(f"{a}: transformers cannot build a {model_type} config: {exc}") from exc
    plan.config.architectures = [SUPPORTED[a]]
    _check_rope(plan.config, m, plan, head_k=head_k, n_rot=n_rot, base=base)
    return plan


def _check_rope(config, m: Meta, plan: Plan, *, head_k: int, n_rot: int, base: float) -> None:
    """The HF rope frequencies of the full-attention layers equal llama.cpp's (``base^(-2i/n)``
    divided by the rope factors, times the linear scale): a guard on the mapping above."""
    import torch
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = config.rope_parameters
    layer_type = "full_attention" if "full_attention" in params else None
    rp = params[layer_type] if layer_type else params
    rt = rp["rope_type"]
    if rt in ("yarn",):
        return  # blended frequencies; YaRN's mapping is checked by the family tests
    fn = (lambda c, d, layer_type=None: (1.0 / (rp["rope_theta"] ** (torch.arange(0, n_rot, 2, dtype=torch.int64).float() / n_rot)), 1.0)) \
        if rt == "default" else ROPE_INIT_FUNCTIONS[rt]
    inv, _ = fn(config, "cpu", layer_type=layer_type) if layer_type else fn(config, "cpu")
    want = base ** (-np.arange(0, n_rot, 2, dtype=np.float64) / n_rot)
    ff = m.tensors.get("rope_freqs.weight")
    if ff is not None and "rope_freqs.weight" in plan.consumed:
        want = want / ff.values().astype(np.float64).reshape(-1)
    elif rt == "longrope":
        want = want / np.asarray(rp["short_factor"], dtype=np.float64)
    elif rt == "linear":
        want = want / rp["factor"]
    got = inv.double().numpy()
    if got.shape != want.shape or not np.allclose(got, want, rtol=1e-5, atol=0):
        raise Unsupported(f"{m.arch}: internal error: rope frequencies ({rt}) differ from llama.cpp's")


# ---------------------------------------------------------------------------- tensors


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
