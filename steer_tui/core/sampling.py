"""How the next token is drawn: the ``Sampling`` settings and the numpy sampler.

Sampling is done here in numpy with a seeded ``numpy.random.Generator``, so a run is
reproducible whatever llama.cpp's sampler does, and the fake engine used by the tests samples
with exactly the same code as the real one. Log-probs reported to the tree are always those of
the raw model distribution (:func:`logsumexp` / :func:`top_k_of` over unmodified logits); the
sampling knobs only decide which token is drawn.
"""

from __future__ import annotations

import dataclasses
import math
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from steer_tui.core.errors import EngineError

__all__ = [
    "REPEAT_LAST_N",
    "SEED_BITS",
    "Sampling",
    "fresh_seed",
    "logsumexp",
    "rank_of",
    "sample_token",
    "top_k_of",
]

#: How many recent tokens the repeat penalty looks at (llama.cpp's default ``penalty_last_n``).
REPEAT_LAST_N = 64

#: A seed drawn when none was given has this many bits (fits every RNG that reads it).
SEED_BITS = 31

#: ``top_k_of`` partitions only the ids within this many nats of the best one, when at
#: least k of them (and at most ``_PREFILTER_MAX`` of them) are there.
_PREFILTER_NATS = 8.0
_PREFILTER_MAX = 4096


def fresh_seed() -> int:
    """A new random seed (recorded wherever it is used, so the run can be reproduced)."""
    return secrets.randbits(SEED_BITS)


@dataclass(frozen=True)
class Sampling:
    """How the next token is drawn. ``temperature == 0`` means greedy (argmax).

    ``top_k == 0`` disables top-k, ``top_p == 1`` disables nucleus sampling, ``min_p == 0``
    disables min-p and ``repeat_penalty == 1`` disables the penalty (over the last 64
    tokens, llama.cpp's rule: positive logits are divided, negative ones multiplied).
    The filters apply in llama.cpp's order: penalty, top-k, top-p, min-p, then temperature.
    ``seed=None`` draws fresh entropy; a fixed seed makes a whole session reproducible.
    """

    temperature: float = 0.8
    top_p: float = 0.95
    top_k: int = 40
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    seed: int | None = None
    max_tokens: int = 512

    def __post_init__(self) -> None:
        def bad(field: str, why: str) -> EngineError:
            return EngineError(f"sampling.{field}: {why} (got {getattr(self, field)!r})")

        for name in ("temperature", "top_p", "min_p", "repeat_penalty"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise bad(name, "must be a finite number")
            object.__setattr__(self, name, float(v))
        for name in ("top_k", "max_tokens"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise bad(name, "must be an integer")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise bad("seed", "must be an integer or null")
        if self.temperature < 0:
            raise bad("temperature", "must be >= 0 (0 = greedy)")
        if not 0 < self.top_p <= 1:
            raise bad("top_p", "must be in (0, 1]")
        if not 0 <= self.min_p <= 1:
            raise bad("min_p", "must be in [0, 1]")
        if self.top_k < 0:
            raise bad("top_k", "must be >= 0 (0 = off)")
        if self.repeat_penalty <= 0:
            raise bad("repeat_penalty", "must be > 0 (1 = off)")
        if self.max_tokens < 1:
            raise bad("max_tokens", "must be >= 1")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise bad("seed", "must be in [0, 2**63)")

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> Sampling:
        """Build from a dict (e.g. a tree file's ``sampling``); unknown keys are an error."""
        if data is None:
            return cls()
        if isinstance(data, Sampling):
            return data
        if not isinstance(data, dict):
            raise EngineError(f"sampling must be a mapping, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise EngineError(
                f"sampling: unknown field(s) {', '.join(map(repr, unknown))}; "
                f"known fields are {', '.join(sorted(known))}"
            )
        return cls(**data)

    def replace(self, **changes: Any) -> Sampling:
        return dataclasses.replace(self, **changes)


def logsumexp(logits: np.ndarray) -> float:
    m = float(logits.max())
    return m + math.log(float(np.exp(logits - m).sum()))


def top_k_of(logits: np.ndarray, k: int, lse: float) -> list[tuple[int, float]]:
    """The ``k`` best ids of one logits row with their log-probs, best first.
    Ties are broken by the lower id so the order is deterministic."""
    n = logits.shape[0]
    k = min(k, n)
    if k <= 0:
        return []
    # cheap pre-filter: the k best are among the ids within _PREFILTER_NATS of the max whenever
    # there are at least k of those (almost always), so partition only that short list
    cand = np.flatnonzero(logits >= logits.max() - _PREFILTER_NATS)
    if k <= len(cand) <= _PREFILTER_MAX:
        sub = logits[cand]
        m = len(cand)
        kth = np.partition(sub, m - k)[m - k] if k < m else sub.min()
        idx = cand[sub >= kth]  # >= keeps every id tied with the k-th value
    else:
        kth = np.partition(logits, n - k)[n - k] if k < n else logits.min()
        idx = np.flatnonzero(logits >= kth)
    vals = logits[idx]
    order = np.lexsort((idx, -vals))[:k]
    return [(int(idx[i]), float(vals[i]) - lse) for i in order]


def sample_token(
    logits: np.ndarray,
    sampling: Sampling,
    rng: np.random.Generator,
    recent: Sequence[int] = (),
) -> int:
    """Draw one token id from a raw logits row according to ``sampling``.

    Pure numpy; ``logits`` is not modified. Greedy (temperature 0) takes the argmax of the
    (penalized) logits and consumes no randomness."""
    x = logits
    if sampling.repeat_penalty != 1.0 and recent:
        x = x.astype(np.float32, copy=True)
        ids = np.unique(np.asarray(recent[-REPEAT_LAST_N:], dtype=np.int64))
        ids = ids[(ids >= 0) & (ids < x.shape[0])]
        v = x[ids]
        x[ids] = np.where(v > 0, v / sampling.repeat_penalty, v * sampling.repeat_penalty)
    if sampling.greedy:
        return int(np.argmax(x))
    n = x.shape[0]
    # top-k: candidate ids, sorted best first
    k = sampling.top_k if 0 < sampling.top_k < n else n
    if k < n:
        cand = np.argpartition(x, n - k)[n - k :]
    else:
        cand = np.arange(n)
    cv = x[cand].astype(np.float64)
    order = np.lexsort((cand, -cv))
    cand, cv = cand[order], cv[order]
    # probabilities of the candidates (before temperature), for top-p and min-p
    p = np.exp(cv - cv[0])
    p /= p.sum()
    keep = len(cand)
    if sampling.top_p < 1.0:
        cum = np.cumsum(p)
        keep = min(keep, int(np.searchsorted(cum, sampling.top_p) + 1))
    if sampling.min_p > 0.0:
        keep = min(keep, max(1, int(np.count_nonzero(p[:keep] >= sampling.min_p * p[0]))))
    cand, cv = cand[:keep], cv[:keep]
    z = cv / sampling.temperature
    q = np.exp(z - z[0])
    q /= q.sum()
    return int(cand[int(rng.choice(len(cand), p=q))]) if len(cand) > 1 else int(cand[0])


def rank_of(top: Sequence[Sequence[float]] | None, token_id: int) -> int | None:
    """1-based rank of ``token_id`` in a top-k list of ``(id, logprob)`` pairs (best first);
    None when it is not in the list (or there is no list)."""
    for r, (tid, _lp) in enumerate(top or (), start=1):
        if int(tid) == token_id:
            return r
    return None
