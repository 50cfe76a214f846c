"""``s``: the steers of this task — where the cuts fell, rejected vs chosen side by side,
and how likely the model already found each correction (flagging steers whose first
chosen token the model ranked first anyway: those teach it nothing)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import DataTable, Static

from steer_tui.core.tree import SteerTree
from steer_tui.ui.render import one_line

BARS = " ▁▂▃▄▅▆▇█"


@dataclass
class SteerRow:
    node_id: str
    position: int  # response token index where the cut fell
    kind: str
    rejected: str
    chosen: str
    p_chosen: float | None  # model probability of the whole correction
    p_first: float | None  # of its first token
    rank_first: int | None  # rank of its first token in the top-k at the cut (1 = best); None: not in top-k
    discarded: bool


def count_steers(tree: SteerTree) -> int:
    """Steers that count for training (not undone, nor under an undone node), in O(nodes)."""
    if not tree.discarded:
        return sum(1 for n in tree.nodes if n.is_steer)
    gone = set(tree.discarded)
    parent = {n.id: n.parent for n in tree.nodes}
    dead: dict[str | None, bool] = {None: False}

    def is_dead(nid: str | None) -> bool:
        chain = []
        while nid not in dead:
            if nid in gone:
                dead[nid] = True
                break
            chain.append(nid)
            nid = parent[nid]
        value = dead[nid]
        for c in chain:
            dead[c] = value
        return value

    return sum(1 for n in tree.nodes if n.is_steer and not is_dead(n.id))


def steer_rows(tree: SteerTree) -> list[SteerRow]:
    """One row per steer (undone ones included, flagged), in O(nodes): a 500-steer task's
    ``tree.steers()`` would build every prefix, which the table does not need."""
    parent = {n.id: n.parent for n in tree.nodes}
    length = {n.id: len(n.tokens) for n in tree.nodes}
    gone = set(tree.discarded)
    depth: dict[str | None, int] = {None: 0}  # response tokens before a node ends
    dead: dict[str | None, bool] = {None: False}

    def resolve(nid: str | None) -> None:
        chain = []
        while nid not in depth:
            chain.append(nid)
            nid = parent[nid]
        for c in reversed(chain):
            p = parent[c]
            depth[c] = depth[p] + length[c]
            dead[c] = dead[p] or c in gone

    rows = []
    for h in tree.nodes:
        if not h.is_steer:
            continue
        resolve(h.id)
        replaced = tree.node(h.replaces)  # type: ignore[arg-type]
        lps = h.logprobs
        p_chosen = math.exp(sum(lps)) if lps else None
        p_first = math.exp(lps[0]) if lps else None
        rank = None
        tops = h.top[0] if h.top else (replaced.top[0] if replaced.top else None)
        if tops and h.tokens:
            for i, (tid, _lp) in enumerate(tops, start=1):
                if int(tid) == h.tokens[0]:
                    rank = i
                    break
        rows.append(
            SteerRow(
                node_id=h.id,
                position=depth[h.parent],
                kind=h.kind,
                rejected=_joined_text(tree, replaced.id),
                chosen=h.text,
                p_chosen=p_chosen,
                p_first=p_first,
                rank_first=rank,
                discarded=dead[h.id],
            )
        )
    return rows


def _joined_text(tree: SteerTree, node_id: str) -> str:
    text = tree.node(node_id).text
    cur = node_id
    while True:
        nxt = next((c for c in tree.children(cur) if c.extra.get("split_from") == cur), None)
        if nxt is None:
            return text
        text += nxt.text
        cur = nxt.id


def histogram(positions: list[int], bins: int = 20) -> str:
    if not positions:
        return ""
    top = max(positions) + 1
    counts = [0] * bins
    for p in positions:
        counts[min(bins - 1, p * bins // top)] += 1
    m = max(counts)
    return "".join(BARS[round(c / m * (len(BARS) - 1))] if c else BARS[0] for c in counts) + f"  (0 … {top} tokens)"


class StatsScreen(ModalScreen[str | None]):
    """Returns a steer's node id to jump to (enter on a row), or None."""

    BINDINGS = [Binding("escape,s,q", "dismiss_none", "Close", show=True)]

    def __init__(self, tree: SteerTree) -> None:
        super().__init__()
        self.steer_tree = tree
        self.rows = steer_rows(tree)

    def compose(self) -> ComposeResult:
        active = [r for r in self.rows if not r.discarded]
        first = [r for r in active if r.rank_first == 1]
        summary = Text(no_wrap=False)
        summary.append(f"{len(active)} steers", style="bold")
        summary.append(f" ({sum(r.kind == 'correction' for r in active)} corrections, "
                       f"{sum(r.kind == 'pick' for r in active)} picks; {len(self.rows) - len(active)} undone)")
        if active:
            summary.append(f"; mean chosen length {sum(len(r.chosen) for r in active) / len(active):.0f} chars")
            summary.append(f"; model already ranked the correction first in {len(first)}/{len(active)} ⚑")
        summary.append("\ncuts along the response: ")
        summary.append(histogram([r.position for r in active]), style="cyan")
        with Vertical(id="stats-box"):
            yield Static(summary, id="stats-summary")
            yield DataTable(id="stats-table", cursor_type="row", zebra_stripes=True)

    def on_mount(self) -> None:
        table = self.query_one(DataTable)
        table.add_column("at", key="at")
        table.add_column("kind", key="kind")
        table.add_column("rejected (model)", key="rejected", width=22)
        table.add_column("chosen (human)", key="chosen", width=22)
        table.add_column("P(chosen)", key="p")
        table.add_column("rank", key="rank")
        for r in self.rows:
            style = "dim strike" if r.discarded else ""
            flag = " ⚑" if r.rank_first == 1 else ""
            table.add_row(
                Text(str(r.position), style=style),
                Text(r.kind, style=style),
                Text(one_line(r.rejected, 22), style="red " + style),
                Text(one_line(r.chosen, 22), style="green " + style),
                Text("—" if r.p_chosen is None else f"{r.p_chosen:.2%}", style=style),
                Text(("—" if r.rank_first is None else str(r.rank_first)) + flag, style=style),
                key=r.node_id,
            )
        table.focus()

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        event.stop()
        self.dismiss(event.row_key.value)

    def action_dismiss_none(self) -> None:
        self.dismiss(None)
