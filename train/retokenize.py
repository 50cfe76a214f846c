"""Trees whose token ids are not the training tokenizer's: detect it, and re-tokenize text.

`VocabCheck` decides per tree whether its ids can be used as they are (same GGUF, or same
vocabulary hash, as the training model). When they cannot, each segment's text is
re-tokenized with character offsets so every span (prompt / model / human) maps to an exact
token range (`retokenize_segments`), and a warning is logged once. No torch.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Sequence

from steer_tui.core.tree import SteerTree

log = logging.getLogger(__name__)


def retokenize_segments(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Tokenize the concatenation of ``texts`` so that every text maps to an exact token range.

    The whole string is tokenized once with an offset mapping (canonical tokens); where a
    segment boundary falls inside a token, the string is also cut at that boundary and the
    pieces are tokenized separately, until every boundary is a token boundary. Returns one
    id list per text (``decode(ids_i) == texts[i]`` for byte-level/sentencepiece
    tokenizers). Special-token text (e.g. ``<|im_start|>``) is recognized as in the model's
    chat template."""
    full = "".join(texts)
    bounds = []
    pos = 0
    for t in texts:
        pos += len(t)
        bounds.append(pos)
    cuts = {0, len(full)}
    while True:
        points = sorted(cuts)
        toks: list[tuple[int, int, int]] = []  # (id, start, end)
        for a, b in zip(points, points[1:]):
            if a == b:
                continue
            enc = tokenizer(full[a:b], add_special_tokens=False, return_offsets_mapping=True)
            for tid, (s, e) in zip(enc["input_ids"], enc["offset_mapping"]):
                toks.append((tid, a + s, a + e))
        bad = {b for b in bounds[:-1] if any(s < b < e for _, s, e in toks)}
        if not bad - cuts:
            break
        cuts |= bad
    out: list[list[int]] = [[] for _ in texts]
    for tid, s, e in toks:
        # a token belongs to the segment its first character is in
        seg = next(i for i, b in enumerate(bounds) if s < b or (s == b == len(full)))
        out[seg].append(tid)
    return out


@dataclass
class VocabCheck:
    """How to decide whether a tree's ids can be used as they are."""

    tokenizer: Any = None
    model_sha256: str | None = None  # the GGUF the training model was converted from
    vocab_sha256: str | None = None  # same hash as the engine's (see train.modeling)
    vocab_size: int | None = None
    _warned: bool = False

    def same(self, tree: SteerTree) -> bool:
        m = tree.model or {}
        if self.tokenizer is None:
            return True
        if self.model_sha256 and m.get("sha256") == self.model_sha256:
            return True
        if self.vocab_sha256 and m.get("vocab_sha256") == self.vocab_sha256:
            return True
        return False

    def warn_once(self, tree: SteerTree) -> None:
        if not self._warned:
            self._warned = True
            log.warning(
                "the training tokenizer's vocabulary differs from the one the trees were captured with "
                "(first: %s, model %s); re-tokenizing node texts with character offsets",
                tree.id,
                (tree.model or {}).get("name"),
            )
