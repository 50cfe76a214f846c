"""The current path as the session screen draws it: pure data over a Session, no textual.

``path_view`` turns the current path into ``Piece``s (one per response token, plus the
struck-through rejected text just before each steer) and remembers where each node
starts, so a token index maps back to its node (``PathView.token_info``) in O(log n).
``sibling_branch`` finds the branch the ``[`` and ``]`` keys move to; ``last_end`` says why
the path stopped and ``steer_point`` where a steer at the cursor goes.
"""

from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass
from typing import Any

from steer_tui.core.token_view import TokenInfo
from steer_tui.core.stats import rejected_text
from steer_tui.core.text import TextDecoder
from steer_tui.core.text import pieces as text_pieces
from steer_tui.core.tree import Node, SteerTree
from steer_tui.ui.render import one_line

GHOST_CHARS = 120  # rejected text shown (struck through) before a correction, at most


@dataclass(slots=True)
class Piece:
    """One thing to draw: a response token, or a span of rejected text."""

    text: str
    author: str = "model"  # "model" | "human" | "rejected"
    logprob: float | None = None

    @property
    def selectable(self) -> bool:
        return self.author != "rejected"


@dataclass
class PathView:
    """What the screen draws for the current path: the pieces, and where each node starts
    (token index), so the token under the cursor maps back to its node."""

    pieces: list[Piece]
    starts: list[int]  # token index where each path node starts
    nodes: list[Node]  # the path nodes

    @property
    def n_tokens(self) -> int:
        return sum(len(n.tokens) for n in self.nodes)

    def locate(self, index: int) -> tuple[Node, int]:
        """(node, offset) of response token ``index``."""
        k = bisect_right(self.starts, index) - 1
        return self.nodes[k], index - self.starts[k]

    def token_info(self, index: int, text: str) -> TokenInfo:
        """Response token ``index`` (whose drawn piece is ``text``), read from its node."""
        node, off = self.locate(index)
        return TokenInfo.at(node, off, index, text)


def path_view(session: Any) -> PathView:
    """The current path as pieces, with the rejected text of each steer struck through
    just before the correction that replaced it. Decodes each token once (UTF-8 safe)."""
    tree = session.tree
    tb = session.engine.token_bytes
    dec = TextDecoder()
    out: list[Piece] = []
    starts: list[int] = []
    nodes = tree.path(session.end) if session.end is not None else []
    index = 0
    for node in nodes:
        starts.append(index)
        if node.replaces:
            # one line, cut short: enough to see what was replaced without pushing text away
            out.append(Piece(one_line(rejected_text(tree, node.replaces), GHOST_CHARS), "rejected"))
        author = "human" if node.is_human else "model"
        lps = node.logprobs
        for off, text in enumerate(text_pieces(tb, node.tokens, dec)):
            out.append(Piece(text, author, lps[off] if lps is not None else None))
        index += len(node.tokens)
    return PathView(out, starts, nodes)


@dataclass
class Branch:
    """A sibling branch to switch to: ``target`` is sibling ``number`` (1-based) of ``count``."""

    target: Node
    number: int
    count: int


def sibling_branch(tree: SteerTree, node_id: str, step: int) -> Branch | None:
    """At the nearest branch point above ``node_id`` (walking up until a node has live
    siblings), the sibling ``step`` places over, cyclically; None if there is none."""
    for node in reversed(tree.path(node_id)):
        sibs = [c for c in tree.children(node.parent) if not tree.is_discarded(c.id)]
        if len(sibs) > 1:
            i = next(j for j, c in enumerate(sibs) if c.id == node.id)
            k = (i + step) % len(sibs)
            return Branch(sibs[k], k + 1, len(sibs))
    return None


def last_end(session: Any) -> str | None:
    """Why the current path's model output stopped (eos | length | context | paused), or
    None when it can simply continue (nothing yet, a cut, or a human node last)."""
    if session.cut is not None or session.end is None:
        return None
    node = session.tree.node(session.end)
    return node.end if node.is_model and node.end != "cut" else None


def steer_point(at: int, n_tokens: int, end: str | None) -> int:
    """Where a steer at cursor ``at`` goes. After an EOS, "at the end" means instead of the
    EOS token: text after an end-of-turn token is never what a user wants to teach."""
    if at >= n_tokens and n_tokens > 0 and end == "eos":
        return n_tokens - 1
    return at
