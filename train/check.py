"""Does the training model compute what llama.cpp computes? (``steer-train check-model``)

Both runtimes score the same token ids of a fixed text (all positions): llama.cpp on the GGUF
(``load_llama(..., logits_all=True)``, CPU, f32 KV cache, no flash attention, so the cache
and the attention kernels add no rounding of their own) and the training loader's model
(``train.modeling.load_model``, float32). The figure is the largest difference of the
next-token log-probability over all positions, in nats.

**Threshold.** ``0.05 + 2 x noise`` nats. ``0.05`` (:data:`THRESHOLD`, the issue's bound)
is for what float arithmetic leaves: on f32 GGUFs of every supported family the measured
difference is 1e-5 to 2e-3 (Gemma's largest: ggml's GELU goes through an f16 lookup table),
while the faults this check exists for cost nats (the stock transformers loader on a llama3
rope-scaled tiny model: 7.2; the issue measured 11.8 and, for Gemma-3's attention scale, 6.8).

``noise`` is the quantisation term, measured on the model itself. The training model holds
the *dequantized* weights, exactly the values llama.cpp multiplies with; what differs is the
other operand: llama.cpp's CPU matmul first rounds the activations to the weight type's
"vec-dot" type (``Q8_0`` blocks of 32 for Q4_0/Q5_0/Q8_0, ``Q8_1`` for Q4_1/Q5_1, ``Q8_K``
blocks of 256 for k- and i-quants, f16/bf16 for f16/bf16 weights; ``type_traits_cpu`` in
ggml-cpu.c). Replaying that rounding in the training model does not reproduce llama.cpp's
numbers (a one-ulp difference flips a rounding, and in a deep model the flips compound until
the two runs are as far apart as without the replay: measured on SmolLM2-135M Q4_1 and
Q8_0), but it reproduces the *size* of the noise: ``noise`` = max |log p(training model with
llama.cpp's activation rounding) - log p(training model)|. Measured, the real difference
llama.cpp vs training model on a correct conversion was 0.9-1.2 x ``noise`` (tiny Q8_0/Q4_0/
Q4_1/F16 models, SmolLM2 Q4_1 and Q8_0: 0.28 vs 0.23 nats for the bundled model), hence the
factor 2. f32 GGUFs have ``noise`` = 0. A quantised GGUF is thus checked as tightly as its own
quantisation allows; ``--tokens`` lengthens the text for faults that only show at long range
(rope scaling of real models changes little below a few thousand positions).

With an adapter the *effect* is compared: ``(base+adapter) - base`` next-token log-probs in
llama.cpp (``adapter.gguf``) against the same delta of the PEFT model, so the export is checked
independently of any base difference; same threshold.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

log = logging.getLogger(__name__)

THRESHOLD = 0.05
NOISE_FACTOR = 2.0

#: a fixed text: prose, a list, code and numbers, ~200 tokens in common tokenizers
TEXT = (
    "The river rose slowly through the night, and by morning the old bridge was gone. "
    "Maria counted the boats: three red, two blue, and one that had no color left at all. "
    "\"We should have left yesterday,\" she said, folding the map twice.\n\n"
    "Steps to make bread:\n1. Mix 500 g of flour with 10 g of salt.\n2. Add 350 ml of warm water "
    "and 7 g of yeast.\n3. Knead for ten minutes, then rest for an hour.\n\n"
    "def mean(xs):\n    return sum(xs) / len(xs) if xs else 0.0\n\n"
    "In 1969, Apollo 11 landed on the Moon; 384,400 km away, the crew took 21.5 hours of "
    "surface time. Questions? Ask: why does ice float, and what happens at 4 degrees Celsius?"
)

#: llama.cpp CPU: the type a weight type's matmul rounds its activations to (ggml-cpu.c)
VEC_DOT = {
    "F32": None, "F16": "F16", "BF16": "BF16",
    "Q4_0": "Q8_0", "Q5_0": "Q8_0", "Q8_0": "Q8_0", "IQ4_NL": "Q8_0", "MXFP4": "Q8_0", "Q1_0": "Q8_0", "Q2_0": "Q8_0",
    "Q4_1": "Q8_1", "Q5_1": "Q8_1", "Q8_1": "Q8_1",
    "Q2_K": "Q8_K", "Q3_K": "Q8_K", "Q4_K": "Q8_K", "Q5_K": "Q8_K", "Q6_K": "Q8_K",
    "IQ2_XXS": "Q8_K", "IQ2_XS": "Q8_K", "IQ2_S": "Q8_K", "IQ3_XXS": "Q8_K", "IQ3_S": "Q8_K",
    "IQ1_S": "Q8_K", "IQ1_M": "Q8_K", "IQ4_XS": "Q8_K", "TQ1_0": "Q8_K", "TQ2_0": "Q8_K",
}


class CheckError(Exception):
    """The check could not run (not a mismatch); the message says why."""


class ModelMismatch(Exception):
    """The pre-training check found that the training model does not compute what llama.cpp
    computes from the GGUF."""


#: tokens of the fixed text the pre-training check scores (cheap: one llama.cpp eval and two
#: forward passes of the training model)
PRECHECK_TOKENS = 128


@dataclass
class Report:
    """What :func:`check_model` measured."""

    model: str
    architecture: str
    file_type: str
    tokens: int
    max_diff: float                      # max |log p_llama.cpp - log p_train|, next tokens
    mean_diff: float = 0.0
    noise: float = 0.0                   # quantisation noise estimate (see the module doc)
    adapter: str | None = None
    adapter_max_diff: float | None = None    # max |delta_cpp - delta_peft|
    adapter_effect: float | None = None      # max |delta_cpp|: how large the adapter's effect is
    restored: list[str] = field(default_factory=list)

    @property
    def threshold(self) -> float:
        return THRESHOLD + NOISE_FACTOR * self.noise

    @property
    def ok(self) -> bool:
        return self.max_diff <= self.threshold and (self.adapter_max_diff is None or self.adapter_max_diff <= self.threshold)

    def lines(self) -> list[str]:
        out = [f"model      {self.model} ({self.architecture}, {self.file_type}), {self.tokens} tokens"]
        for note in self.restored:
            out.append(f"restored   {note}")
        out.append(f"base       max |log p_llama.cpp - log p_train| = {self.max_diff:.4f} nats (mean {self.mean_diff:.5f})")
        if self.noise:
            out.append(f"noise      {self.noise:.4f} nats: llama.cpp's activation rounding for {self.file_type} weights, "
                       f"measured on this model")
        if self.adapter is not None:
            out.append(f"adapter    {self.adapter}: max |delta_llama.cpp - delta_peft| = {self.adapter_max_diff:.4f} nats "
                       f"(largest effect {self.adapter_effect:.3f} nats)")
        how = f"{THRESHOLD} + {NOISE_FACTOR} x noise = {self.threshold:.4f}" if self.noise else f"{THRESHOLD}"
        out.append(f"verdict    {'MATCH' if self.ok else 'MISMATCH'} (threshold {how} nats)")
        return out

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d.update(ok=self.ok, threshold=self.threshold)
        return d


# ---------------------------------------------------------------------------- llama.cpp side


@contextlib.contextmanager
def _quiet_stderr():
    """llama.cpp prints context notes on fd 2 even with verbose=False; keep check output clean
    (errors still arrive as exceptions)."""
    if os.environ.get("STEER_CHECK_VERBOSE"):
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


_memo: dict[tuple, Any] = {}


def _file_key(path) -> tuple:
    st = os.stat(path)
    return (os.path.realpath(path), st.st_size, st.st_mtime_ns)


def _remember(key: tuple, make):
    """The last few llama.cpp results (the same GGUF is scored again for every adapter and
    every comparison; llama.cpp is deterministic on the CPU)."""
    if key not in _memo:
        if len(_memo) >= 4:
            _memo.pop(next(iter(_memo)))
        _memo[key] = make()
    return _memo[key]


def llama_logprobs(gguf: str | os.PathLike[str], tokens: Sequence[int], *, adapter: str | None = None,
                   n_threads: int | None = None, extra_bufts: bool | str | None = None) -> np.ndarray:
    """``[len(tokens), n_vocab]`` log-softmax of llama.cpp's logits at every position (CPU,
    f32 KV cache, flash attention off; context = the token count rounded up, so LongRoPE
    models use their short factors, as in the app's default context)."""
    key = ("lp", _file_key(gguf), _file_key(adapter) if adapter else None, tuple(tokens), n_threads, extra_bufts)
    return _remember(key, lambda: _llama_logprobs(gguf, tokens, adapter=adapter, n_threads=n_threads,
                                                  extra_bufts=extra_bufts))


def _llama_logprobs(gguf, tokens, *, adapter, n_threads, extra_bufts) -> np.ndarray:
    from steer_tui.core.llama_load import load_llama

    n = len(tokens)
    n_ctx = max(64, -(-n // 64) * 64)
    kw: dict[str, Any] = dict(n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, n_gpu_layers=0, logits_all=True,
                              verbose=False, type_k=0, type_v=0, flash_attn=False, seed=0)
    # half the cores: torch's OpenMP workers keep spinning for a while after the training
    # model's forward, and llama.cpp on every core then runs several times slower
    kw["n_threads"] = kw["n_threads_batch"] = n_threads or max(1, (os.cpu_count() or 2) // 2)
    if adapter is not None:
        kw["lora_path"] = str(adapter)
    try:
        with _quiet_stderr():
            llm = load_llama(str(gguf), extra_bufts=extra_bufts, **kw)
    except Exception as exc:
        raise CheckError(f"llama.cpp cannot load {gguf}{' with ' + str(adapter) if adapter else ''}: {exc}") from None
    try:
        with _quiet_stderr():
            llm.reset()
            llm.eval(list(tokens))
        logits = np.array(llm.scores[:n], dtype=np.float64)
    finally:
        llm.close()
    return _log_softmax(logits)


def llama_tokenize(gguf: str | os.PathLike[str], text: str = TEXT) -> list[int]:
    """Token ids of ``text`` by llama.cpp's own tokenizer (BOS as the model adds it)."""
    return list(_remember(("tok", _file_key(gguf), text), lambda: tuple(_llama_tokenize(gguf, text))))


def _llama_tokenize(gguf, text: str) -> list[int]:
    from steer_tui.core.llama_load import load_llama

    with _quiet_stderr():
        llm = load_llama(str(gguf), vocab_only=True, verbose=False)
    try:
        return list(llm.tokenize(text.encode("utf-8"), add_bos=bool(llm._model.add_bos_token()), special=False))
    finally:
        llm.close()


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=-1, keepdims=True)
    return (x - np.log(np.exp(x).sum(axis=-1, keepdims=True))).astype(np.float32)


# ---------------------------------------------------------------------------- training side


def _round_blocks(x, block: int, f16_scale: bool):
    """``(x_hat, q, d)``: symmetric 8-bit rounding per block of the last dim, as ggml's
    ``quantize_row_q8_0/q8_1`` (scale ``amax/127`` stored as f16) or ``q8_K`` (f32 scale)."""
    import torch

    shape = x.shape
    xb = x.reshape(*shape[:-1], shape[-1] // block, block)
    amax = xb.abs().amax(dim=-1, keepdim=True)
    d = amax / 127.0
    inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    q = torch.round(xb * inv).clamp(-127, 127)
    ds = d.half().float() if f16_scale else d
    return (q * ds).reshape(shape), q, d


def round_like_llama(x, vec_dot: str | None):
    """``x`` rounded as llama.cpp's CPU matmul rounds activations for a weight of that vec-dot type."""
    import torch

    if vec_dot is None:
        return x
    if vec_dot == "F16":
        return x.to(torch.float16).to(x.dtype)
    if vec_dot == "BF16":
        return x.to(torch.bfloat16).to(x.dtype)
    block = 256 if vec_dot == "Q8_K" else 32
    if x.shape[-1] % block:
        return x
    return _round_blocks(x.float(), block, f16_scale=vec_dot != "Q8_K")[0].to(x.dtype)


def emulate_llama_rounding(model, weight_types: dict[str, str]) -> list:
    """Forward pre-hooks on the Linear layers whose GGUF weights are quantised / f16 / bf16:
    their input is rounded as llama.cpp's CPU matmul rounds it. Returns the handles
    (``.remove()`` them)."""
    import torch.nn as nn

    handles = []
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    for name, mod in base.named_modules():
        if not isinstance(mod, nn.Linear):
            continue
        key = name.replace(".base_layer", "") + ".weight"
        vd = VEC_DOT.get(weight_types.get(key, "F32"), None)
        if vd is not None:
            handles.append(mod.register_forward_pre_hook(
                lambda _m, args, _vd=vd: (round_like_llama(args[0], _vd), *args[1:])))
    return handles


def hf_logprobs(model, tokens: Sequence[int], *, weight_types: dict[str, str] | None = None) -> np.ndarray:
    """``[len(tokens), vocab]`` log-softmax of the training model (float32, no grad); with
    ``weight_types``, llama.cpp's activation rounding is injected (noise estimate)."""
    import torch

    from train.reference import eval_mode

    dev = next(model.parameters()).device
    handles = emulate_llama_rounding(model, weight_types) if weight_types else []
    try:
        with torch.no_grad(), eval_mode(model):
            ids = torch.tensor([list(tokens)], dtype=torch.long, device=dev)
            logits = model(input_ids=ids).logits[0].double()
            return torch.log_softmax(logits, dim=-1).cpu().numpy()
    finally:
        for h in handles:
            h.remove()


def next_token_diff(a: np.ndarray, b: np.ndarray, tokens: Sequence[int]) -> np.ndarray:
    """``|a - b|`` at the log-prob of each actual next token (positions 0..n-2)."""
    n = min(len(a), len(b))
    vocab = min(a.shape[1], b.shape[1])
    idx = np.asarray(tokens[1:n])
    if idx.size and idx.max() >= vocab:
        raise CheckError(f"token id {int(idx.max())} is outside the model's vocabulary ({vocab})")
    rows = np.arange(n - 1)
    return np.abs(a[rows, idx] - b[rows, idx])


def next_token_lp(a: np.ndarray, tokens: Sequence[int]) -> np.ndarray:
    idx = np.asarray(tokens[1:len(a)])
    return a[np.arange(len(idx)), idx]


# ---------------------------------------------------------------------------- check


def check_text(gguf: str | os.PathLike[str], n_tokens: int | None = None, text: str = TEXT) -> list[int]:
    """Token ids of the check text (repeated up to ``n_tokens`` when given)."""
    tokens = llama_tokenize(gguf, text)
    if n_tokens:
        more = llama_tokenize(gguf, "\n\n" + text)
        bos = tokens[:1] if len(more) and tokens[:1] != more[:1] else []
        body = more[len(bos):]
        while len(tokens) < n_tokens and body:
            tokens += body
        tokens = tokens[:n_tokens]
    return tokens


def check_model(gguf: str | os.PathLike[str], *, model=None, weight_types: dict[str, str] | None = None,
                adapter: str | os.PathLike[str] | None = None, n_tokens: int | None = None,
                trust_remote_code: bool = False, extra_bufts: bool | str | None = None,
                n_threads: int | None = None) -> Report:
    """Compare llama.cpp on ``gguf`` (+ ``adapter``: an adapter.gguf whose directory holds the
    PEFT adapter, or a steer-train --out directory) with the training loader's model.

    ``model``: an already loaded training model of this GGUF (the pre-training check), with
    its ``weight_types`` (from the converted directory's steer_source.json)."""
    from train import gguf_model as G
    from train.modeling import ModelError, load_model, resolve_model, source_metadata

    gguf = Path(gguf)
    try:
        meta = G.read_meta(gguf)
    except Exception as exc:
        raise CheckError(f"cannot read {gguf}: {exc}") from None
    restored: list[str] = []
    if model is None:
        source = resolve_model(str(gguf))
        model, _tok, where = load_model(source, trust_remote_code=trust_remote_code)
        info = source_metadata(where)
        weight_types = info.get("weight_types") or {}
        restored = list(info.get("restored") or [])
    weight_types = weight_types or {}
    tokens = check_text(gguf, n_tokens)
    if len(tokens) < 2:
        raise CheckError("the check text tokenizes to fewer than 2 tokens")
    lp_cpp = llama_logprobs(gguf, tokens, extra_bufts=extra_bufts, n_threads=n_threads)
    lp_hf = hf_logprobs(model, tokens)
    d = next_token_diff(lp_cpp, lp_hf, tokens)
    noise = 0.0
    if any(VEC_DOT.get(t) for t in weight_types.values()):
        noise = float(next_token_diff(hf_logprobs(model, tokens, weight_types=weight_types), lp_hf, tokens).max())
    rep = Report(model=str(gguf), architecture=meta.arch, file_type=meta.file_type(), tokens=len(tokens),
                 max_diff=float(d.max()), mean_diff=float(d.mean()), noise=noise, restored=restored)
    if adapter is not None:
        ad_gguf, ad_dir = _adapter_paths(adapter)
        from peft import PeftModel

        try:
            peft_model = PeftModel.from_pretrained(model, str(ad_dir))
        except Exception as exc:
            raise ModelError(f"cannot load the PEFT adapter in {ad_dir}: {exc}") from None
        try:
            lp_hf_ad = hf_logprobs(peft_model, tokens)
        finally:
            peft_model.unload()  # the base model as it was
        lp_cpp_ad = llama_logprobs(gguf, tokens, adapter=str(ad_gguf), extra_bufts=extra_bufts, n_threads=n_threads)
        delta_cpp = next_token_lp(lp_cpp_ad, tokens) - next_token_lp(lp_cpp, tokens)
        delta_hf = next_token_lp(lp_hf_ad, tokens) - next_token_lp(lp_hf, tokens)
        rep.adapter = str(ad_gguf)
        rep.adapter_max_diff = float(np.abs(delta_cpp - delta_hf).max())
        rep.adapter_effect = float(np.abs(delta_cpp).max())
    return rep


def _adapter_paths(adapter: str | os.PathLike[str]) -> tuple[Path, Path]:
    p = Path(adapter)
    if p.is_dir():
        g, d = p / "adapter.gguf", p
    else:
        g, d = p, p.parent
    if not g.is_file():
        raise CheckError(f"--adapter {adapter}: no adapter.gguf (give a steer-train --out directory or its adapter.gguf)")
    if not (d / "adapter_config.json").is_file():
        raise CheckError(f"--adapter {adapter}: {d} has no adapter_config.json (the PEFT adapter the GGUF was exported from)")
    return g, d


def pretraining_check(model, gguf: str | os.PathLike[str], info: dict, *, allow_mismatch: bool = False) -> Report:
    """``steer-train``'s check before training a GGUF's model: raises :class:`ModelMismatch`
    (unless ``allow_mismatch``) when the loaded training model does not match llama.cpp.
    Runs on the model's device in float32 (a CUDA GPU when there is one)."""
    import torch

    dev = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}") if torch.cuda.is_available() else torch.device("cpu")
    model.to(dev)
    rep = check_model(gguf, model=model, weight_types=info.get("weight_types") or {}, n_tokens=PRECHECK_TOKENS)
    rep.restored = list(info.get("restored") or [])
    for line in rep.lines():
        log.info("model check: %s", line)
    if not rep.ok:
        msg = (f"the training model does not compute what llama.cpp computes from {Path(gguf).name}: "
               f"max difference {rep.max_diff:.3f} nats > {rep.threshold:.3f} over {rep.tokens} tokens; an adapter "
               f"trained on it would not do in llama.cpp what it did in training. Run `steer-train check-model "
               f"{gguf}` for details (please report it); --allow-model-mismatch trains anyway")
        if not allow_mismatch:
            raise ModelMismatch(msg)
        log.warning("%s (training anyway: --allow-model-mismatch)", msg)
    return rep
