"""The engine contract (``Engine``) and ``BaseEngine``, the logic every engine shares:
token ids in, token ids (with log-probs and top-k) out, with KV-cache reuse.

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
human reading the tree and for training; the sampling knobs (``steer_tui.core.sampling``)
only decide which token is drawn.

``BaseEngine`` holds all of that logic; a concrete engine supplies three primitives
(``_decode``, ``_kv_truncate``, ``_token_bytes_uncached``) and its metadata.
``LlamaEngine`` (llama_engine.py) wraps llama-cpp-python; ``FakeEngine`` (fake_engine.py)
is a tiny deterministic byte-level model for tests. ``open_engine`` (engine.py) builds one.
This module never imports a concrete engine.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple, Protocol, runtime_checkable

import numpy as np

from steer_tui.core.errors import EngineError
from steer_tui.core.sampling import Sampling, logsumexp, sample_token, top_k_of
from steer_tui.core.vocab import vocab_sha256

__all__ = ["BaseEngine", "Engine", "Generation", "Step"]


class Step(NamedTuple):
    """One evaluated or generated token: its id, its raw-model log-prob and the top-k
    alternatives at that position as ``(id, logprob)`` pairs, best first."""

    id: int
    logprob: float
    top: list[tuple[int, float]]


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
    """Everything the session, auto-steering and the UI use of a model; ``BaseEngine``
    implements it (see there for the semantics), ``LlamaEngine`` and ``FakeEngine`` build on
    that. ``bos_id`` is None for a model without a BOS token; ``add_bos`` says whether a
    prompt starts with it."""

    name: str
    path: str
    n_vocab: int
    n_ctx: int
    eos_ids: tuple[int, ...]
    bos_id: int | None
    add_bos: bool
    n_evaluated: int

    @property
    def sha256(self) -> str: ...
    @property
    def vocab_sha256(self) -> str: ...
    @property
    def adapter(self) -> dict | None: ...
    @property
    def loaded_adapter(self) -> dict | None: ...
    @property
    def adapter_enabled(self) -> bool: ...
    def set_adapter_enabled(self, enabled: bool) -> None: ...

    def describe(self) -> dict[str, Any]: ...
    def tokenize(self, text: str, *, add_bos: bool = False, special: bool = False) -> list[int]: ...
    def token_bytes(self, token_id: int) -> bytes: ...
    def all_token_bytes(self) -> list[bytes]: ...
    def detokenize(self, tokens: Sequence[int]) -> str: ...
    def is_eos(self, token_id: int) -> bool: ...
    def render_chat(self, messages: list[dict]) -> str: ...
    def logits(self, context: Sequence[int]) -> np.ndarray: ...
    def top(self, context: Sequence[int], k: int = 5) -> list[tuple[int, float]]: ...
    def score(self, context: Sequence[int], continuation: Sequence[int], *, top_k: int = 5) -> list[Step]: ...
    def generate(self, context: Sequence[int], sampling: Sampling, *, max_tokens: int | None = None,
                 stop: threading.Event | None = None, top_k: int = 5, rng: np.random.Generator | None = None,
                 ) -> Generation: ...
    def close(self) -> None: ...


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
    bos_id: int | None = None
    add_bos: bool = False

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
    def loaded_adapter(self) -> dict | None:
        """The adapter loaded at start, whether or not it is enabled now (None: no adapter)."""
        return None

    @property
    def adapter_enabled(self) -> bool:
        """Whether the loaded adapter is on; False when none is loaded."""
        return False

    def set_adapter_enabled(self, enabled: bool) -> None:
        """Switch the loaded adapter on or off for what is evaluated next. An engine that
        loads none refuses to switch one on."""
        if enabled:
            raise EngineError("no adapter is loaded (start with --adapter PATH.gguf)")

    @property
    def sha256(self) -> str:
        raise NotImplementedError

    @property
    def vocab_sha256(self) -> str:
        """``steer_tui.core.vocab.vocab_sha256`` of this model's token bytes (cached)."""
        if self._vocab_sha256 is None:
            self._vocab_sha256 = vocab_sha256(self.all_token_bytes())
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

    def close(self) -> None:
        """Free the model (a no-op unless the engine holds native resources)."""

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

    def _check_context(self, context: Sequence[int]) -> None:
        """A context must be non-empty, fit the window and hold only ids of the vocabulary."""
        if not context:
            raise EngineError("the context is empty: a prompt needs at least one token")
        if len(context) > self.n_ctx:
            raise EngineError(
                f"the context has {len(context)} tokens but the model's context window is "
                f"{self.n_ctx} (n_ctx); shorten the prompt or raise --n-ctx"
            )
        self.check_ids(context)

    def _prepare(self, context: Sequence[int]) -> np.ndarray:
        """Make the cache hold exactly ``context``; return the logits after its last token.

        Evaluates only what is not cached: nothing if ``context`` is what was last
        evaluated, one token if it is a strict prefix of the cache (a rollback), the
        suffix after the longest common prefix otherwise."""
        self._check_context(context)
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
            return _ranked(self._prepare(context), k)[1]

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
                lse, top = _ranked(row, top_k)
                steps.append(Step(int(tok), float(row[tok]) - lse, top))
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
        self._check_context(context)
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
                lse, top = _ranked(row, top_k)
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


def _ranked(row: np.ndarray, top_k: int) -> tuple[float, list[tuple[int, float]]]:
    """The log-normaliser of one raw logits row and its ``top_k`` alternatives, best first."""
    lse = logsumexp(row)
    return lse, top_k_of(row, top_k, lse)
