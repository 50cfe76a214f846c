"""Text derived from token ids: per-token records (``Token``, ``TokenInfo``) with UTF-8-safe
pieces, and the decoding positions a session needs (where a path's text stands after a node,
where a rollback may cut without splitting a character).

Token ids are the truth; every text here is computed from them with the engine's
``token_bytes`` and a :class:`~steer_tui.core.text.TextDecoder`, so the pieces of a path
always concatenate to its detokenized text.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from steer_tui.core.text import TextDecoder
from steer_tui.core.tree import Node, SteerTree

__all__ = ["Token", "TokenBytes", "TokenInfo", "decoder_at", "snap_to_character", "tokens_view"]

#: ``engine.token_bytes``: the bytes one token id stands for.
TokenBytes = Callable[[int], bytes]


@dataclass(frozen=True)
class Token:
    """One generated token as ``Session.generate`` yields it. ``index`` is its position in
    the response (0 = first token after the prompt); ``text`` is its UTF-8-safe piece."""

    id: int
    text: str
    logprob: float
    top: list[tuple[int, float]]
    index: int


@dataclass(frozen=True)
class TokenInfo:
    """One token of the current path, for the UI: where it lives (``node_id``, ``offset``
    inside the node) and what it is. ``text`` pieces concatenate to the response text."""

    index: int
    node_id: str
    offset: int
    id: int
    text: str
    logprob: float | None
    top: list[tuple[int, float]] | None
    author: str
    kind: str

    @classmethod
    def at(cls, node: Node, offset: int, index: int, text: str) -> TokenInfo:
        """The record of ``node.tokens[offset]``, response token ``index``, whose piece is ``text``."""
        return cls(
            index=index,
            node_id=node.id,
            offset=offset,
            id=node.tokens[offset],
            text=text,
            logprob=node.logprobs[offset] if node.logprobs is not None else None,
            top=[(int(t), float(lp)) for t, lp in node.top[offset]] if node.top is not None else None,
            author=node.author,
            kind=node.kind,
        )


def tokens_view(tree: SteerTree, end: str | None, token_bytes: TokenBytes) -> list[TokenInfo]:
    """One ``TokenInfo`` per response token of the path from the root to ``end``."""
    out: list[TokenInfo] = []
    dec = TextDecoder()
    for node in tree.path(end):
        for off, tok in enumerate(node.tokens):
            out.append(TokenInfo.at(node, off, len(out), dec.feed(token_bytes(tok))))
    return out


def decoder_at(tree: SteerTree, node_id: str | None, token_bytes: TokenBytes) -> TextDecoder:
    """A text decoder that has seen every response token up to the end of ``node_id``."""
    dec = TextDecoder()
    for t in tree.path_tokens(node_id):
        dec.feed(token_bytes(t))
    return dec


def snap_to_character(path: list[Node], n: int, token_bytes: TokenBytes) -> int:
    """The largest k <= n such that the first k response tokens of ``path`` end on a whole
    character (a byte-level tokenizer can split one character over several tokens)."""
    dec = TextDecoder()
    clean = 0
    i = 0
    for node in path:
        for t in node.tokens:
            if i >= n:
                return clean
            dec.feed(token_bytes(t))
            i += 1
            if not dec.pending():
                clean = i
    return clean
