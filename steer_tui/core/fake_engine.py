"""A tiny deterministic engine for tests of everything above the model.

Vocabulary: ids 0..255 are single bytes, then three control tokens (``<s>`` BOS,
``<|im_end|>`` EOS, ``<|im_start|>``), then a few multi-byte merges (``" the"``, ``"é"``...).
Characters without a merge (``"€"``, ``"🙂"``) are several byte tokens, so a multi-byte
UTF-8 character split across tokens happens naturally. ``tokenize`` is greedy longest-match.

The "model" follows scripted continuations: it finds the longest suffix of the context
(2 to 16 tokens) that occurs in one of its scripts and strongly prefers the token that
follows it there (EOS at a script's end; the script's first token when nothing matches),
plus deterministic pseudo-random noise seeded by the last two tokens. Logits depend only
on the context, never on call order, so cache reuse can be checked against fresh engines.

It shares all cache/sampling/scoring logic with the llama.cpp engine (``BaseEngine``),
so ``n_evaluated`` means the same thing. Like llama.cpp it keeps its own "KV cache" (the
tokens it has evaluated, ``kv_tokens``): ``_decode`` computes logits from it and refuses a
position that does not follow it, and ``_kv_truncate`` really drops its tail. A rollback
whose truncation were skipped or wrong therefore fails on the fake as it would on the model.
"""

from __future__ import annotations

import hashlib
import json
import zlib
from collections.abc import Sequence

import numpy as np

from steer_tui.core.engine_base import BaseEngine
from steer_tui.core.errors import EngineError

__all__ = ["FakeEngine"]

BOS, EOS, IM_START = 256, 257, 258
SPECIALS = {BOS: b"<s>", EOS: b"<|im_end|>", IM_START: b"<|im_start|>"}
MERGES = (" the", "the", "ing", " a", " and", "ll", "é", "ö", "  ", "\n\n")

DEFAULT_SCRIPTS = (
    "1. Apple\n2. Banana\n3. Cherry\n4. Mango",
    "The café serves crème brûlée for 5€ 🙂 and the tea is free.",
)


class FakeEngine(BaseEngine):
    """Deterministic byte-level fake model. ``scripts`` are the texts it likes to write;
    ``boost`` is how much it prefers the scripted token (logit units) over noise of scale
    ``noise``. ``n_ctx`` is small by default so context-full paths are easy to test."""

    def __init__(
        self,
        scripts: Sequence[str] = DEFAULT_SCRIPTS,
        *,
        n_ctx: int = 512,
        boost: float = 8.0,
        noise: float = 1.0,
        name: str = "fake",
    ) -> None:
        super().__init__()
        self.name = name
        self.path = "<fake>"
        self.n_ctx = n_ctx
        self._vocab: list[bytes] = [bytes([i]) for i in range(256)]
        self._vocab += [SPECIALS[BOS], SPECIALS[EOS], SPECIALS[IM_START]]
        self._vocab += [m.encode("utf-8") for m in MERGES]
        self.n_vocab = len(self._vocab)
        self.eos_ids = (EOS,)
        self._eos_set = frozenset(self.eos_ids)
        self.bos_id = BOS
        self._merge_ids = {m.encode("utf-8"): 259 + i for i, m in enumerate(MERGES)}
        self._max_merge = max(len(m) for m in self._merge_ids)
        self.boost = float(boost)
        self.noise = float(noise)
        self.scripts = list(scripts)
        self._script_tokens = [self.tokenize(s) for s in self.scripts]
        self._kv: list[int] = []  # what this "model" has evaluated, position by position
        self._sha = hashlib.sha256(
            json.dumps({"scripts": self.scripts, "boost": boost, "noise": noise, "n_ctx": n_ctx}).encode()
        ).hexdigest()

    # ---- metadata / tokens ------------------------------------------------------------

    @property
    def sha256(self) -> str:
        return self._sha

    def _token_bytes_uncached(self, token_id: int) -> bytes:
        return self._vocab[token_id]

    def tokenize(self, text: str, *, add_bos: bool = False, special: bool = False) -> list[int]:
        data = text.encode("utf-8")
        out: list[int] = [BOS] if add_bos else []
        i = 0
        while i < len(data):
            if special:
                hit = next((tid for tid, s in SPECIALS.items() if data.startswith(s, i)), None)
                if hit is not None:
                    out.append(hit)
                    i += len(SPECIALS[hit])
                    continue
            for n in range(min(self._max_merge, len(data) - i), 1, -1):
                tid = self._merge_ids.get(data[i : i + n])
                if tid is not None:
                    out.append(tid)
                    i += n
                    break
            else:
                out.append(data[i])
                i += 1
        return out

    def render_chat(self, messages: list[dict]) -> str:
        parts = []
        for m in messages:
            parts.append(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n")
        return "".join(parts) + "<|im_start|>assistant\n"

    # ---- the "model" ------------------------------------------------------------------

    def _predict(self, context: Sequence[int]) -> int:
        """The scripted next token: follow the longest context suffix found in a script
        (at least 2 tokens long, or 1 token at a script's start); else start a script."""
        best_k, best = 0, None
        for toks in self._script_tokens:
            n = len(toks)
            for k in range(min(16, len(context), n), best_k, -1):
                suffix = list(context[-k:])
                j = next(
                    (j for j in range(k, n + 1) if toks[j - k : j] == suffix and (k >= 2 or j == 1)),
                    None,
                )
                if j is not None:
                    best_k, best = k, (toks[j] if j < n else EOS)
                    break
        if best is None:
            return self._script_tokens[0][0] if self._script_tokens and self._script_tokens[0] else EOS
        return best

    def _row(self, context: Sequence[int]) -> np.ndarray:
        key = np.asarray(list(context[-2:]), dtype=np.int64).tobytes()
        rng = np.random.default_rng(zlib.crc32(key))
        row = (rng.standard_normal(self.n_vocab) * self.noise).astype(np.float32)
        row[BOS] -= 20.0  # never generate BOS / <|im_start|>
        row[IM_START] -= 20.0
        row[self._predict(context)] += self.boost
        return row

    @property
    def kv_tokens(self) -> list[int]:
        """A copy of the fake's own KV cache (BaseEngine's ``cached_tokens`` should equal it)."""
        return list(self._kv)

    def _decode(self, tokens: Sequence[int], n_past: int, all_logits: bool) -> np.ndarray:
        if n_past != len(self._kv):
            raise EngineError(
                f"fake engine: decode at position {n_past}, but its KV cache holds {len(self._kv)} tokens"
            )
        ctx = list(self._kv)  # the logits follow what this engine holds, not what it was told
        rows = []
        for t in tokens:
            ctx.append(int(t))
            if all_logits:
                rows.append(self._row(ctx))
        out = np.stack(rows) if all_logits else self._row(ctx)
        self._kv = ctx
        return out

    def _kv_truncate(self, n: int) -> None:
        if not 0 <= n <= len(self._kv):
            raise EngineError(f"fake engine: cannot truncate a KV cache of {len(self._kv)} tokens to {n}")
        del self._kv[n:]
