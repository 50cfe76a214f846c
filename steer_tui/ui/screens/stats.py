"""``s``: the steers of this task — where the cuts fell, rejected vs chosen side by side,
and how likely the model already found each correction (flagging steers whose first
chosen token the model ranked first anyway: those teach it nothing). The numbers come
from :mod:`steer_tui.core.stats`; this module draws them."""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import DataTable, Static

from steer_tui.core.stats import steer_rows
from steer_tui.core.tree import SteerTree
from steer_tui.ui.render import one_line

BARS = " ▁▂▃▄▅▆▇█"


def histogram(positions: list[int], bins: int = 20) -> str:
    """One line of bars: how many cuts fell in each of ``bins`` stretches of the response."""
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
