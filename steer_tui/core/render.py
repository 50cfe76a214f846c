"""A steer tree as plain, terminal-safe text (``steer-tui show``)."""

from __future__ import annotations

import math

from steer_tui.core.safe_text import visible
from steer_tui.core.sampling import rank_of
from steer_tui.core.tree import Node, SteerTree


def _clip(text: str, width: int) -> str:
    t = visible(text, newlines=False, tabs=False)
    return t if len(t) <= width else t[: width - 1] + "…"


def _label(tree: SteerTree, n: Node, replaced_by: dict[str, str], discarded: set[str], accepted: set[str]) -> str:
    if n.is_model:
        tag = f"model  [{n.end or 'open'}]"
    else:
        who = f" by {visible(n.annotator, newlines=False)}" if n.annotator else ""
        tag = f"human  {n.kind}{who}"
        if n.is_steer:
            tag = f"STEER  {n.kind}{who}, replaces {n.replaces}"
    marks = []
    if n.id in replaced_by:
        marks.append(f"rejected by {replaced_by[n.id]}")
    if n.is_human and n.logprobs:
        marks.append(f"model p(correction)={math.exp(sum(n.logprobs)):.2g}")
        if n.top and rank_of(n.top[0], n.tokens[0]) == 1:
            marks.append("model's top choice")
    if n.id in discarded:
        marks.append("DISCARDED")
    if n.id in accepted:
        marks.append("ACCEPTED")
    if n.adapter:
        marks.append("adapter")
    extra = f"  ({'; '.join(marks)})" if marks else ""
    return visible(f"{n.id} {tag} {len(n.tokens)} tok{extra}", newlines=False, tabs=False)


def render_tree(tree: SteerTree, width: int = 100) -> str:
    steers = tree.steers()
    replaced_by = {n.replaces: n.id for n in tree.nodes if n.replaces}
    discarded = set(tree.discarded)
    accepted = set(tree.accepted)
    model = tree.model.get("name") or tree.model.get("path") or "?"
    lines = [
        f"task {visible(tree.id, newlines=False, tabs=False)}: {_clip(tree.title, width)}",
        f"model {visible(str(model), newlines=False)}"
        + (f" + adapter {visible(str(tree.model['adapter'].get('path')), newlines=False)}" if tree.model.get("adapter") else ""),
        f"{len(tree.nodes)} nodes, {len(steers)} steers, {len(tree.accepted)} accepted, {len(tree.discarded)} discarded",
        f"prompt: {_clip(tree.prompt.get('text', ''), width)}",
        "",
    ]

    # iterative walk (paths can be thousands of nodes deep); an only child continues at
    # its parent's indent, so a long chain of pauses does not march off the screen
    stack: list[tuple[Node, str, bool, bool]] = []

    def push_children(parent: str | None, indent: str) -> None:
        kids = tree.children(parent)
        for i in range(len(kids) - 1, -1, -1):
            stack.append((kids[i], indent, i == len(kids) - 1, len(kids) == 1))

    push_children(None, "")
    while stack:
        n, indent, last, only = stack.pop()
        if only:
            lines.append(indent + _label(tree, n, replaced_by, discarded, accepted))
            child_indent = indent
        else:
            lines.append(indent + ("└─ " if last else "├─ ") + _label(tree, n, replaced_by, discarded, accepted))
            child_indent = indent + ("   " if last else "│  ")
        body = child_indent + "   "
        lines.append(body + "“" + _clip(n.text, max(20, width - len(body))) + "”")
        push_children(n.id, child_indent)
    return "\n".join(lines) + "\n"
