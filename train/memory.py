"""How much memory a training step will take, measured on the model before training starts,
and a refusal (with what to change) when it cannot fit the device.

The estimate is the sum of

* **weights**: every parameter and buffer as loaded (already resident when we check);
* **trainable state**: gradient + two AdamW moments per trainable (LoRA) parameter;
* **saved activations** of one micro-batch of ``T`` tokens (``T`` = ``--token-budget``, or
  the longest sequence when one is longer: it gets a row of its own). They are *measured*,
  not guessed: a probe forwards rows of ``P``, ``2P`` and ``4P`` tokens through the real
  model in training mode (dropout on, gradient checkpointing off, the same attention
  backend and the same loss head: log-probs + the full-vocabulary KL at every position) and
  counts the bytes autograd saves for backward (`torch.autograd.graph.saved_tensors_hooks`,
  once per storage, parameters left out). A fit ``a + b*T + c*T^2`` (``c``: attention
  scores / the packed mask) extrapolates to ``T``. With gradient checkpointing the layers
  keep only their inputs (``layers x T x hidden``) plus one layer recomputed at a time;
* **transient**: what backward holds besides the saved tensors: one layer's worth of
  activation gradients (the saved bytes / layers, twice) and the chunked output layer's
  two ``chunk x V`` fp32 blocks (+ one dequantized weight with ``--load-in-4bit``);
* **allocator** (CPU only): glibc's malloc keeps freed blocks in its heap, so the peak RSS
  of a step sits above the bytes of live tensors: 0.75 x (activations + transient) when a
  step runs in several micro-batches, 0.25 x when in one, + 32 MiB for what the first step
  allocates once (measured by ``bench/memory_estimate.py``).

On CUDA the check compares what is still to be allocated (everything but the weights)
with the free device memory; on the CPU with ``MemAvailable``. The probe costs three short
forwards (no backward) and restores the RNG state, so it does not change the run.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass, field

import numpy as np
import torch

from train.chunked import chunk_rows
from train.quant import NF4_BYTES_PER_WEIGHT, bnb_problem, is_4bit, nf4_weight_bytes, quantizable, quantized_bytes

log = logging.getLogger(__name__)

__all__ = ["MemoryEstimate", "MemoryRefused", "estimate_memory", "available_bytes", "check_memory", "SavedBytes"]

GiB = 1 << 30
#: fraction of the available memory a run may plan to use (allocator slack, fragmentation)
HEADROOM = 0.9
#: CPU (glibc malloc): what the first training step allocates once and keeps (autograd and
#: kernel scratch, Python objects): 14-25 MiB measured by bench/memory_estimate.py
CPU_FIRST_STEP = 32 << 20
#: CPU (glibc malloc): freed activation blocks the heap keeps, as a fraction of the
#: activations + backward transient, when a step runs in several micro-batches (each one's
#: blocks are freed while the next allocates other sizes) and when it runs in one; measured
#: peak RSS sat up to 1.48x / 1.16x above the live tensors (bench/memory_estimate.py; 1.73x /
#: 1.15x on SmolLM2, docs/training.md, Memory)
CPU_ALLOCATOR_SLACK = {"several": 0.75, "one": 0.25}
#: fp32 ``chunk x V`` blocks the chunked output layer holds at once in backward (the
#: recomputed chunk's logits and their gradient)
HEAD_BLOCKS = 2


class MemoryRefused(RuntimeError):
    """The estimated peak does not fit the device; the message says what to change."""


class SavedBytes:
    """Bytes autograd saves for backward while active, once per storage, parameters left
    out (they exist anyway)."""

    def __init__(self, model=None):
        self.params = {p.untyped_storage()._cdata for p in model.parameters()} if model is not None else set()
        self.seen: set = set()
        self.total = 0

    def _pack(self, t: torch.Tensor):
        st = t.untyped_storage()
        if st._cdata not in self.params and st._cdata not in self.seen:
            self.seen.add(st._cdata)
            self.total += st.nbytes()
        return t

    def __enter__(self):
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        return self._ctx.__exit__(*exc)


@dataclass
class MemoryEstimate:
    device: str
    tokens: int
    weights: int
    trainable_state: int
    activations: int
    transient: int
    available: int | None = None
    notes: list[str] = field(default_factory=list)
    allocator: int = 0
    micro_batches: bool = True

    @property
    def peak(self) -> int:
        return self.weights + self.trainable_state + self.activations + self.transient + self.allocator

    @property
    def to_allocate(self) -> int:
        """What is not resident yet when the check runs (the weights are)."""
        return self.peak - self.weights

    @property
    def fits(self) -> bool:
        return self.available is None or self.to_allocate <= HEADROOM * self.available

    def metrics(self) -> dict:
        """The estimate as ``metrics.json`` records it."""
        return {"peak_bytes": self.peak, "tokens": self.tokens, "weights": self.weights,
                "trainable_state": self.trainable_state, "activations": self.activations,
                "transient": self.transient, "allocator": self.allocator, "available": self.available,
                "device": self.device}

    def summary(self) -> str:
        def g(n):
            return f"{n / GiB:.2f} GiB"

        s = (f"estimated peak memory per device ({self.device}, {self.tokens} tokens per micro-batch): "
             f"{g(self.peak)} = weights {g(self.weights)} + LoRA grads/optimizer {g(self.trainable_state)} + "
             f"saved activations {g(self.activations)} + backward transient {g(self.transient)}"
             + (f" + allocator {g(self.allocator)}" if self.allocator else ""))
        if self.available is not None:
            s += f"; available {g(self.available)} (needs {g(self.to_allocate)} beyond the loaded weights)"
        return s


def _rss_free_cpu() -> int | None:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def available_bytes(device) -> int | None:
    """Free memory for the run: CUDA free device memory, or the host's MemAvailable."""
    dev = torch.device(device)
    if dev.type == "cuda":
        free, _total = torch.cuda.mem_get_info(dev)
        return int(free)
    if dev.type == "cpu":
        return _rss_free_cpu()
    return None


@contextlib.contextmanager
def _probe_mode(model):
    """Training mode (dropout on), gradient checkpointing off, RNG untouched afterwards."""
    flags = [(m, m.gradient_checkpointing) for m in model.modules()
             if isinstance(getattr(m, "gradient_checkpointing", None), bool)]
    was = model.training
    cpu_rng = torch.random.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        for m, _ in flags:
            m.gradient_checkpointing = False
        model.train()
        yield
    finally:
        for m, v in flags:
            m.gradient_checkpointing = v
        model.train(was)
        torch.random.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)


def probe_saved_bytes(model, tokens: int, *, kl: bool = True, packing: str = "tree") -> int:
    """Bytes saved for backward by one row of ``tokens`` tokens: log-probs of every
    prediction plus (``kl``) the full KL at every position against a no-grad reference pass."""
    from train.losses import full_reference_kl
    from train.logprobs import token_logprobs

    vocab = int(getattr(model.config, "vocab_size", 0) or 0) or 2
    seq = [int(x) for x in (np.arange(tokens) * 7 + 3) % vocab]
    masks = [[True] * (tokens - 1)] if kl else None
    ref = None
    if kl:
        with torch.no_grad():
            _, ref = token_logprobs(model, [seq], packing=packing, token_budget=tokens, dist_masks=masks,
                                    dist_states=True, fallback=True)
    with SavedBytes(model) as sb:
        if kl:
            logps, dists = token_logprobs(model, [seq], packing=packing, token_budget=tokens, dist_masks=masks,
                                          dist_states=True, fallback=True)
            out = logps[0].sum() + full_reference_kl(dists, ref)
        else:
            out = token_logprobs(model, [seq], packing=packing, token_budget=tokens, fallback=True)[0].sum()
    del out
    return sb.total


def _fit(points: list[tuple[int, int]]) -> tuple[float, float, float]:
    """``a + b T + c T^2`` through three points, with ``b, c >= 0`` (bytes never shrink)."""
    t = np.array([p[0] for p in points], dtype=np.float64)
    y = np.array([p[1] for p in points], dtype=np.float64)
    a, b, c = np.linalg.solve(np.stack([np.ones_like(t), t, t * t], 1), y)
    if c < 0:  # noise: refit linear
        c = 0.0
        b, a = np.polyfit(t, y, 1)
    return float(a), max(float(b), 0.0), float(c)


def estimate_memory(model, *, tokens: int, device=None, kl: bool = True, packing: str = "tree",
                    gradient_checkpointing: bool = False, probe_tokens: int = 32,
                    micro_batches: bool = True) -> MemoryEstimate:
    """Estimate the peak memory of a training step of ``tokens`` tokens per micro-batch (see
    module doc). ``micro_batches``: whether a step can run in more than one (the CPU
    allocator term is larger then)."""
    params = list(model.parameters())
    dev = torch.device(device) if device is not None else (params[0].device if params else torch.device("cpu"))
    four = is_4bit(model)
    weights = sum(p.numel() * p.element_size() for p in params) + \
        sum(b.numel() * b.element_size() for b in model.buffers()) + (quantized_bytes(model) if four else 0)
    trainable = [p for p in params if p.requires_grad]
    # gradient (param dtype) + AdamW exp_avg + exp_avg_sq (param dtype)
    state = sum(3 * p.numel() * p.element_size() for p in trainable)
    p = max(8, int(probe_tokens))
    with _probe_mode(model):
        pts = [(n, probe_saved_bytes(model, n, kl=kl, packing=packing)) for n in (p, 2 * p, 4 * p)]
    a, b, c = _fit(pts)
    full = a + b * tokens + c * tokens * tokens
    cfg = getattr(model, "config", None)
    layers = int(getattr(cfg, "num_hidden_layers", 1) or 1)
    hidden = int(getattr(cfg, "hidden_size", 0) or 0)
    act_bytes = params[0].element_size() if params else 4
    if torch.is_autocast_enabled(dev.type) if dev.type in ("cuda", "cpu") else False:
        act_bytes = 2
    notes = [f"probe: {pts[0][1]:,} / {pts[1][1]:,} / {pts[2][1]:,} bytes saved at {p} / {2 * p} / {4 * p} tokens"]
    per_layer = full / layers
    if gradient_checkpointing:
        activations = layers * tokens * hidden * act_bytes + per_layer
        notes.append("gradient checkpointing: layer inputs + one layer recomputed")
    else:
        activations = full
    vocab = int(getattr(cfg, "vocab_size", 0) or 0)
    head = HEAD_BLOCKS * min(chunk_rows(vocab), tokens) * vocab * 4 if vocab else 0
    transient = int(2 * per_layer + head + (_dequantized_weight(model) if four else 0))
    # the CPU's malloc keeps freed blocks (RSS is what the OOM killer sees); CUDA's caching
    # allocator is not modelled (no GPU measurement yet)
    slack = CPU_ALLOCATOR_SLACK["several" if micro_batches else "one"]
    allocator = int(slack * (activations + transient) + CPU_FIRST_STEP) if dev.type == "cpu" else 0
    return MemoryEstimate(device=str(dev), tokens=int(tokens), weights=int(weights), trainable_state=int(state),
                          activations=int(activations), transient=transient, available=available_bytes(dev),
                          notes=notes, allocator=allocator, micro_batches=micro_batches)


def _dequantized_weight(model) -> int:
    """bitsandbytes dequantizes one NF4 weight at a time to the compute dtype for each matmul
    (forward and backward): the largest such weight is held on top of everything else."""
    best = 0
    for p in model.parameters():
        qs = getattr(p, "quant_state", None)
        if qs is not None:
            best = max(best, int(np.prod(qs.shape)) * torch.empty(0, dtype=qs.dtype).element_size())
    return best


def qlora_peak(model, est: MemoryEstimate) -> int:
    """The estimated peak of the same step with the base loaded in 4-bit (``--load-in-4bit``):
    the quantizable Linear weights in NF4, the rest as now, plus one dequantized weight."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    params = list(base.parameters())
    dtype = params[0].dtype if params else torch.float32
    lin = quantizable(base)
    largest = max((m.weight.numel() for _, m in lin), default=0) * torch.empty(0, dtype=dtype).element_size()
    return nf4_weight_bytes(model, dtype) + est.trainable_state + est.activations + est.transient + est.allocator \
        + largest


def _qlora_tip(model, est: MemoryEstimate, room_without_weights: float) -> str:
    peak = qlora_peak(model, est)
    if peak > room_without_weights:
        return f"not --load-in-4bit alone (QLoRA: estimated peak {peak / GiB:.2f} GiB)"
    why = bnb_problem(est.device)
    note = f" ({why})" if why else ""
    return f"--load-in-4bit (QLoRA, NF4 base at {NF4_BYTES_PER_WEIGHT:.3f} bytes/weight: estimated peak " \
           f"{peak / GiB:.2f} GiB){note}"


def suggest(model, est: MemoryEstimate, *, kl: bool, packing: str, gradient_checkpointing: bool) -> list[str]:
    """What would fit: the largest power-of-two token budget, checkpointing, QLoRA."""
    if est.available is None:
        return []
    out = []
    room = HEADROOM * est.available
    t, e = est.tokens // 2, None
    while t >= 64:
        e = estimate_memory(model, tokens=t, kl=kl, packing=packing, gradient_checkpointing=gradient_checkpointing,
                            micro_batches=True)
        if e.to_allocate <= room:
            out.append(f"--token-budget {t} (estimated peak {e.peak / GiB:.2f} GiB)")
            break
        t //= 2
    else:
        if e is not None:
            out.append(f"not a smaller --token-budget alone (even 64 tokens: estimated peak {e.peak / GiB:.2f} GiB)")
    if not gradient_checkpointing:
        e = estimate_memory(model, tokens=est.tokens, kl=kl, packing=packing, gradient_checkpointing=True,
                            micro_batches=est.micro_batches)
        out.append(f"--gradient-checkpointing (estimated peak {e.peak / GiB:.2f} GiB)")
    if not is_4bit(model):
        # a 4-bit run loads afresh: the weights resident now are not there
        out.append(_qlora_tip(model, est, HEADROOM * est.available + est.weights))
    out.append("a smaller model")
    return out


def check_memory(model, *, tokens: int, kl: bool, packing: str, gradient_checkpointing: bool, device=None,
                 force: bool = False, report: bool = True, micro_batches: bool = True) -> MemoryEstimate:
    """Estimate the peak memory of a step, print the estimate (``report``: on the main rank),
    and raise `MemoryRefused` naming what to change when it cannot fit, unless ``force``
    (``--ignore-memory-check``: a warning instead). Under torch.distributed every rank
    refuses when any rank's estimate does not fit, or none does."""
    est = estimate_memory(model, tokens=tokens, device=device, kl=kl, packing=packing,
                          gradient_checkpointing=gradient_checkpointing, micro_batches=micro_batches)
    bad = torch.tensor([0.0 if est.fits else 1.0], device=device)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)  # all ranks refuse, or none
    if report:
        print(est.summary(), flush=True)
    if bad.item() > 0:
        if not force:
            tips = suggest(model, est, kl=kl, packing=packing,
                           gradient_checkpointing=gradient_checkpointing) if not est.fits else []
            raise MemoryRefused(f"this run will not fit: {est.summary()}"
                                + (". Try " + "; or ".join(tips) if tips else " (on another rank)")
                                + ". --ignore-memory-check runs anyway.")
        log.warning("the estimate exceeds the free memory; running anyway (--ignore-memory-check)")
    return est
