"""The inference engine: token ids in, token ids (with log-probs and top-k) out.

Everything above this module (Session, UI, auto-steering) speaks token ids. An engine
keeps a model's KV cache, knows which tokens are in it, and evaluates only what changed:

* ``generate(context, sampling)`` finds the longest common prefix between ``context`` and
  the cached tokens, drops the rest from the KV cache and evaluates only the suffix. When the
  context is exactly what was last evaluated, the cached logits are used and nothing is
  evaluated; when it is a strict prefix of the cache (a rollback), only its last token is
  evaluated again to get fresh logits. The kept prefix is never evaluated twice.
* ``score(context, continuation)`` evaluates a continuation the human typed and reports the
  model's log-prob and top-k for each of its tokens.

Log-probs are always those of the **raw model distribution**: ``log_softmax`` of the
unmodified logits of the last position (no temperature, no top-k/top-p/min-p truncation,
no repeat penalty). That is what "how likely did the model find this token" means for a
human reading the tree and for training; the sampling knobs only decide which token is
drawn. Sampling itself is done here in numpy with a seeded ``numpy.random.Generator``, so
a run is reproducible whatever llama.cpp's sampler does, and so the fake engine used by the
tests samples with exactly the same code as the real one.

``BaseEngine`` holds all of that logic; a concrete engine supplies three primitives
(``_decode``, ``_kv_truncate``, ``_token_bytes_uncached``) and its metadata.
``LlamaEngine`` (llama_engine.py) wraps llama-cpp-python; ``FakeEngine`` (fake_engine.py)
is a tiny deterministic byte-level model for tests.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Protocol, runtime_checkable

import numpy as np

from steer_tui.core.store import file_sha256  # re-exported: model and adapter provenance

__all__ = [
    "END_REASONS",
    "BaseEngine",
    "Engine",
    "EngineError",
    "Generation",
    "Sampling",
    "Step",
    "file_sha256",
    "open_engine",
]

#: Why a generation ended (a node's ``end`` field also knows ``cut``).
END_REASONS = ("eos", "length", "context", "paused")

#: How many recent tokens the repeat penalty looks at (llama.cpp's default ``penalty_last_n``).
REPEAT_LAST_N = 64


class EngineError(Exception):
    """The engine cannot do what was asked (bad model file, prompt too long, bad token id).

    The message is meant for the user: it names the file or argument and what is wrong."""


# --------------------------------------------------------------------------- sampling


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


class Step(NamedTuple):
    """One evaluated or generated token: its id, its raw-model log-prob and the top-k
    alternatives at that position as ``(id, logprob)`` pairs, best first."""

    id: int
    logprob: float
    top: list[tuple[int, float]]


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
    # cheap pre-filter: the k best are among the ids within 8 nats of the max whenever
    # there are at least k of those (almost always), so partition only that short list
    cand = np.flatnonzero(logits >= logits.max() - 8.0)
    if k <= len(cand) <= 4096:
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


# --------------------------------------------------------------------------- protocol


class Generation(Iterator[Step]):
    """Iterator over generated steps. After it is exhausted, ``end`` says why:
    ``eos`` (an end-of-generation token was produced; it is the last step),
    ``length`` (``max_tokens`` reached), ``context`` (the context window is full) or
    ``paused`` (the ``stop`` event was set). ``end`` is None while it is still running
    or if the consumer stopped iterating early."""

    def __init__(self, gen: Iterator[Step]):
        self._gen = gen
        self.end: str | None = None

    def __iter__(self) -> Generation:
        return self

    def __next__(self) -> Step:
        try:
            return next(self._gen)
        except StopIteration as stop:
            self.end = stop.value
            raise StopIteration from None

    def close(self) -> None:
        self._gen.close()  # type: ignore[attr-defined]


@runtime_checkable
class Engine(Protocol):
    """What the session needs from a model. See ``BaseEngine`` for the semantics."""

    name: str
    path: str
    n_vocab: int
    n_ctx: int
    eos_ids: tuple[int, ...]
    n_evaluated: int

    @property
    def sha256(self) -> str: ...
    @property
    def vocab_sha256(self) -> str: ...
    @property
    def adapter(self) -> dict | None: ...

    def tokenize(self, text: str, *, add_bos: bool = False, special: bool = False) -> list[int]: ...
    def token_bytes(self, token_id: int) -> bytes: ...
    def render_chat(self, messages: list[dict]) -> str: ...
    def score(self, context: Sequence[int], continuation: Sequence[int], *, top_k: int = 5) -> list[Step]: ...
    def generate(
        self,
        context: Sequence[int],
        sampling: Sampling,
        *,
        max_tokens: int | None = None,
        stop: threading.Event | None = None,
        top_k: int = 5,
        rng: np.random.Generator | None = None,
    ) -> Generation: ...


# --------------------------------------------------------------------------- base


class BaseEngine:
    """KV-cache bookkeeping, sampling and scoring shared by every engine.

    Subclasses implement:

    * ``_decode(tokens, n_past, all_logits) -> np.ndarray``: evaluate ``tokens`` at positions
      ``n_past..``; return a ``(len(tokens), n_vocab)`` array of logits if ``all_logits``
      else a ``(n_vocab,)`` row for the last token. The arrays must stay valid after the call
      (copy out of any native buffer).
    * ``_kv_truncate(n)``: drop positions ``>= n`` from the KV cache.
    * ``_token_bytes_uncached(id) -> bytes``.

    ``n_evaluated`` counts every token ever passed to ``_decode``: tests and benches diff it
    to prove that a rollback evaluated 0 or 1 tokens. Engines are not meant to be used from
    two threads at once; a lock makes accidental concurrent use safe (serialized), not fast.
    """

    name: str = "engine"
    path: str = ""
    n_vocab: int = 0
    n_ctx: int = 0
    eos_ids: tuple[int, ...] = ()

    def __init__(self) -> None:
        self.n_evaluated = 0
        self._cached: list[int] = []  # tokens whose K/V are in the cache, in order
        self._version = 0  # bumped by every cache change; lets a generation skip re-checks
        self._last_logits: np.ndarray | None = None  # logits after the last cached token
        self._lock = threading.RLock()
        self._token_bytes: list[bytes] | None = None
        self._vocab_sha256: str | None = None
        self._eos_set: frozenset[int] = frozenset()

    # ---- metadata ------------------------------------------------------------------

    @property
    def adapter(self) -> dict | None:
        """``{"path", "sha256"}`` of the LoRA adapter in use for the next evaluation, else None."""
        return None

    @property
    def sha256(self) -> str:
        raise NotImplementedError

    @property
    def vocab_sha256(self) -> str:
        """sha256 over every token's bytes in id order, each prefixed with its length
        (4 bytes, little endian). Two models with equal values give token ids the same meaning."""
        if self._vocab_sha256 is None:
            h = hashlib.sha256()
            for b in self.all_token_bytes():
                h.update(len(b).to_bytes(4, "little"))
                h.update(b)
            self._vocab_sha256 = h.hexdigest()
        return self._vocab_sha256

    def describe(self) -> dict[str, Any]:
        """The tree file's ``model`` object for this engine."""
        return {
            "name": self.name,
            "path": self.path,
            "sha256": self.sha256,
            "n_vocab": self.n_vocab,
            "vocab_sha256": self.vocab_sha256,
            "eos_ids": list(self.eos_ids),
            "adapter": self.adapter,
        }

    # ---- tokens ----------------------------------------------------------------------

    def _token_bytes_uncached(self, token_id: int) -> bytes:
        raise NotImplementedError

    def all_token_bytes(self) -> list[bytes]:
        if self._token_bytes is None:
            self._token_bytes = [self._token_bytes_uncached(i) for i in range(self.n_vocab)]
        return self._token_bytes

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes a token stands for (control tokens as their literal text, e.g.
        ``b"<|im_end|>"``). Byte-level tokens may be part of a multi-byte UTF-8 character."""
        self.check_ids([token_id])
        return self.all_token_bytes()[token_id]

    def detokenize(self, tokens: Sequence[int]) -> str:
        """Bytes of all tokens, decoded as UTF-8 (invalid or incomplete bytes become U+FFFD)."""
        tb = self.all_token_bytes()
        self.check_ids(tokens)
        return b"".join(tb[t] for t in tokens).decode("utf-8", errors="replace")

    def check_ids(self, tokens: Sequence[int], what: str = "token id") -> None:
        for t in tokens:
            if isinstance(t, bool) or not isinstance(t, (int, np.integer)) or not 0 <= t < self.n_vocab:
                raise EngineError(f"{what} {t!r} is not in this model's vocabulary (0..{self.n_vocab - 1})")

    def is_eos(self, token_id: int) -> bool:
        return token_id in self._eos_set

    # ---- primitives (subclasses) -----------------------------------------------------

    def _decode(self, tokens: Sequence[int], n_past: int, all_logits: bool) -> np.ndarray:
        raise NotImplementedError

    def _kv_truncate(self, n: int) -> None:
        raise NotImplementedError

    # ---- cache -------------------------------------------------------------------------

    @property
    def cached_tokens(self) -> list[int]:
        """A copy of the token ids whose keys/values are in the KV cache."""
        return list(self._cached)

    def reset(self) -> None:
        """Forget the KV cache (the next call evaluates its whole context)."""
        with self._lock:
            self._kv_truncate(0)
            self._cached = []
            self._last_logits = None
            self._version += 1

    def _eval(self, tokens: Sequence[int], *, all_logits: bool = False) -> np.ndarray:
        """Append ``tokens`` to the cache; return the logits (last row, or all rows)."""
        n = len(self._cached)
        if n + len(tokens) > self.n_ctx:
            raise EngineError(
                f"context of {n + len(tokens)} tokens does not fit the model's context window "
                f"(n_ctx={self.n_ctx})"
            )
        out = self._decode(list(tokens), n, all_logits)
        self.n_evaluated += len(tokens)
        self._cached.extend(int(t) for t in tokens)
        self._last_logits = out[-1] if all_logits else out
        self._version += 1
        return out

    def _truncate(self, n: int) -> None:
        if n < len(self._cached):
            self._kv_truncate(n)
            del self._cached[n:]
            self._last_logits = None
            self._version += 1

    def _prepare(self, context: Sequence[int]) -> np.ndarray:
        """Make the cache hold exactly ``context``; return the logits after its last token.

        Evaluates only what is not cached: nothing if ``context`` is what was last
        evaluated, one token if it is a strict prefix of the cache (a rollback), the
        suffix after the longest common prefix otherwise."""
        if not context:
            raise EngineError("the context is empty: a prompt needs at least one token")
        if len(context) > self.n_ctx:
            raise EngineError(
                f"the context has {len(context)} tokens but the model's context window is "
                f"{self.n_ctx} (n_ctx); shorten the prompt or raise --n-ctx"
            )
        self.check_ids(context)
        cached = self._cached
        lcp = 0
        for a, b in zip(cached, context):
            if a != b:
                break
            lcp += 1
        if lcp == len(context) == len(cached) and self._last_logits is not None:
            return self._last_logits
        if lcp == len(context):
            lcp -= 1  # need fresh logits of the last token: re-evaluate just that one
        self._truncate(lcp)
        return self._eval(context[lcp:])

    # ---- public operations ---------------------------------------------------------------

    def logits(self, context: Sequence[int]) -> np.ndarray:
        """The raw logits after ``context`` (a copy)."""
        with self._lock:
            return np.array(self._prepare(context), dtype=np.float32, copy=True)

    def top(self, context: Sequence[int], k: int = 5) -> list[tuple[int, float]]:
        """The ``k`` most likely next tokens after ``context`` with their log-probs."""
        with self._lock:
            row = self._prepare(context)
            return top_k_of(row, k, logsumexp(row))

    def score(self, context: Sequence[int], continuation: Sequence[int], *, top_k: int = 5) -> list[Step]:
        """Evaluate ``continuation`` after ``context``: for each of its tokens, the model's
        log-prob of it and the top-k at that position. Leaves the cache holding
        ``context + continuation`` (so generating right after it evaluates nothing)."""
        continuation = list(continuation)
        self.check_ids(continuation)
        with self._lock:
            if len(context) + len(continuation) > self.n_ctx:
                raise EngineError(
                    f"context ({len(context)}) + continuation ({len(continuation)}) tokens do not "
                    f"fit the model's context window (n_ctx={self.n_ctx})"
                )
            first = self._prepare(context)
            if not continuation:
                return []
            # one batch; row i predicts continuation[i + 1], the last row is kept as the
            # cache's last logits so generating right after this evaluates nothing
            out = self._eval(continuation, all_logits=True)
            rows = [first] + [out[i] for i in range(out.shape[0] - 1)]
            steps = []
            for tok, row in zip(continuation, rows):
                lse = logsumexp(row)
                steps.append(Step(int(tok), float(row[tok]) - lse, top_k_of(row, top_k, lse)))
            return steps

    def generate(
        self,
        context: Sequence[int],
        sampling: Sampling,
        *,
        max_tokens: int | None = None,
        stop: threading.Event | None = None,
        top_k: int = 5,
        rng: np.random.Generator | None = None,
    ) -> Generation:
        """Generate after ``context``. Yields ``Step``s; the returned ``Generation``'s ``end``
        tells why it stopped (see ``Generation``). ``rng`` defaults to one seeded with
        ``sampling.seed``. The prompt is checked (ids, length) before anything is evaluated.

        Each yielded token is evaluated lazily, when the next one is requested; a token that
        ends the generation (EOS, last of ``max_tokens``) is never evaluated, so the cache
        afterwards holds ``context + generated[:-1]`` and the next ``generate`` continuing
        the same path evaluates exactly one token."""
        context = [int(t) for t in context]
        if not context:
            raise EngineError("the context is empty: a prompt needs at least one token")
        if len(context) > self.n_ctx:
            raise EngineError(
                f"the context has {len(context)} tokens but the model's context window is "
                f"{self.n_ctx} (n_ctx); shorten the prompt or raise --n-ctx"
            )
        self.check_ids(context)
        limit = sampling.max_tokens if max_tokens is None else max_tokens
        if rng is None:
            rng = np.random.default_rng(sampling.seed)
        return Generation(self._generate(context, sampling, limit, stop, top_k, rng))

    def _generate(
        self,
        seq: list[int],
        sampling: Sampling,
        limit: int,
        stop: threading.Event | None,
        top_k: int,
        rng: np.random.Generator,
    ) -> Iterator[Step]:
        produced = 0
        if limit <= 0:
            return "length"
        mine = -1  # cache version right after our last evaluation
        while True:
            if stop is not None and stop.is_set():
                return "paused"
            if len(seq) >= self.n_ctx:
                return "context"
            with self._lock:
                if produced and self._version == mine:
                    # nobody touched the cache since we left it at seq[:-1]: evaluate the
                    # new token only, without re-comparing the whole context (O(1) per token)
                    row = self._eval(seq[-1:])
                else:
                    row = self._prepare(seq)
                mine = self._version
                lse = logsumexp(row)
                top = top_k_of(row, top_k, lse)
                if sampling.greedy and sampling.repeat_penalty == 1.0 and top:
                    tok = top[0][0]
                else:
                    tok = sample_token(row, sampling, rng, seq)
                lp = float(row[tok]) - lse
            produced += 1
            yield Step(tok, lp, top)
            if tok in self._eos_set:
                return "eos"
            if produced >= limit:
                return "length"
            seq.append(tok)


# --------------------------------------------------------------------------- helpers


_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


def gguf_metadata(path: str | os.PathLike[str], keys: Sequence[str], *, max_kv: int = 4096) -> dict[str, Any]:
    """Read the given scalar/string metadata keys from a GGUF header (pure Python, stops as
    soon as all are found). Raises EngineError for a truncated or malformed header."""
    import struct

    want = set(keys)
    found: dict[str, Any] = {}
    try:
        with open(path, "rb") as fh:

            def read(fmt: str) -> Any:
                size = struct.calcsize(fmt)
                data = fh.read(size)
                if len(data) != size:
                    raise EOFError
                return struct.unpack(fmt, data)[0]

            def read_str() -> bytes:
                n = read("<Q")
                if n > 1 << 24:
                    raise ValueError("string too long")
                data = fh.read(n)
                if len(data) != n:
                    raise EOFError
                return data

            def skip(vtype: int) -> None:
                if vtype in _GGUF_SCALARS:
                    fh.seek(struct.calcsize(_GGUF_SCALARS[vtype]), 1)
                elif vtype == 8:
                    fh.seek(read("<Q"), 1)
                elif vtype == 9:
                    etype, count = read("<I"), read("<Q")
                    if etype in _GGUF_SCALARS:
                        fh.seek(struct.calcsize(_GGUF_SCALARS[etype]) * count, 1)
                    else:
                        for _ in range(count):
                            skip(etype)
                else:
                    raise ValueError(f"unknown value type {vtype}")

            if fh.read(4) != b"GGUF":
                raise ValueError("bad magic")
            version = read("<I")
            if version < 2:
                raise ValueError(f"unsupported GGUF version {version}")
            read("<Q")  # tensor count
            n_kv = read("<Q")
            for _ in range(min(n_kv, max_kv)):
                key = read_str().decode("utf-8", "replace")
                vtype = read("<I")
                if key in want and vtype in _GGUF_SCALARS:
                    found[key] = read(_GGUF_SCALARS[vtype])
                elif key in want and vtype == 8:
                    found[key] = read_str().decode("utf-8", "replace")
                else:
                    skip(vtype)
                if len(found) == len(want):
                    break
    except (EOFError, ValueError, OSError) as exc:
        raise EngineError(f"{str(path)!r}: unreadable GGUF header ({exc or 'file is truncated'})") from None
    return found


def _check_gguf(path: str | os.PathLike[str], what: str) -> Path:
    from steer_tui.core.models import ModelNotFound, check_gguf

    try:
        return check_gguf(path).resolve()
    except ModelNotFound as exc:
        raise EngineError(f"{what}: {exc}") from None


def open_engine(
    model_path: str | os.PathLike[str] | None = None,
    *,
    n_ctx: int = 4096,
    n_gpu_layers: int = -1,
    adapter: str | os.PathLike[str] | None = None,
    seed: int | None = None,
    n_threads: int | None = None,
    extra_bufts: bool | str | None = None,
) -> BaseEngine:
    """Load a GGUF model with llama.cpp. ``None`` = the bundled default model.

    A missing, unreadable or non-GGUF file (model or adapter) raises ``EngineError`` naming
    the path before llama.cpp sees it. Loading prints nothing. ``extra_bufts``: see
    ``steer_tui.core.llama_load`` (None = ``$STEER_EXTRA_BUFTS`` or ``"auto"``)."""
    if model_path is None:
        from steer_tui.core.models import ModelNotFound, default_model_path

        try:
            path = default_model_path()
        except ModelNotFound as exc:
            raise EngineError(str(exc)) from None
    else:
        path = _check_gguf(model_path, "model")
    adapter_path = _check_gguf(adapter, "adapter") if adapter is not None else None
    if adapter_path is not None:
        meta = gguf_metadata(adapter_path, ("general.type", "adapter.type"))
        kind = meta.get("general.type"), meta.get("adapter.type")
        if kind != ("adapter", "lora"):
            # llama.cpp would accept (or crash on) a whole model passed as an adapter
            raise EngineError(
                f"adapter {str(adapter_path)!r} is not a LoRA adapter GGUF (general.type="
                f"{kind[0]!r}, adapter.type={kind[1]!r}); export one with steer-train"
            )
    if isinstance(n_ctx, bool) or not isinstance(n_ctx, int) or n_ctx < 16:
        raise EngineError(f"n_ctx must be an integer >= 16 (got {n_ctx!r})")
    from steer_tui.core.llama_engine import LlamaEngine

    return LlamaEngine(
        path, n_ctx=n_ctx, n_gpu_layers=n_gpu_layers, adapter=adapter_path, seed=seed, n_threads=n_threads,
        extra_bufts=extra_bufts,
    )
