"""``tab``: the model's top-k alternatives at the cursor; choosing one is a ``pick`` steer.
The rows are built here from the recorded (or freshly evaluated) top-k."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import OptionList, Static
from textual.widgets.option_list import Option

from steer_tui.core.errors import EngineError
from steer_tui.ui.render import one_line


@dataclass
class Alternative:
    token_id: int
    text: str
    logprob: float
    current: bool = False  # the token the path has there now


def alternatives(top: Iterable[tuple[int, float]], *, current: int | None, engine: Any, k: int) -> list[Alternative]:
    """The first ``k`` of the top-k ``[id, logprob]`` pairs as rows, ``current`` marked."""
    return [
        Alternative(int(tid), decode_token(engine, int(tid)), float(lp), current=int(tid) == current)
        for tid, lp in list(top)[:k]
    ]


def decode_token(engine: Any, token_id: int) -> str:
    """A token's text on its own (invalid UTF-8 shown as U+FFFD); ``<id>`` if the engine
    does not know the id."""
    try:
        return engine.token_bytes(token_id).decode("utf-8", errors="replace")
    except EngineError:
        return f"<{token_id}>"


class AlternativesScreen(ModalScreen[int | None]):
    """Returns the chosen token id, or None (escape)."""

    BINDINGS = [Binding("escape,tab", "dismiss_none", "Cancel", show=True)]

    def __init__(self, alternatives: list[Alternative], where: str) -> None:
        super().__init__()
        self.alternatives = alternatives
        self.title_text = f"Alternatives {where} — enter picks (a pick steer), esc cancels"

    def compose(self) -> ComposeResult:
        with Vertical(id="alt-box"):
            yield Static(Text(self.title_text), id="alt-title")
            options = []
            for rank, alt in enumerate(self.alternatives, start=1):
                label = Text(no_wrap=True, overflow="ellipsis")
                label.append(f"{rank:>2}. ")
                label.append(f"{math.exp(alt.logprob) * 100:6.2f}% ", style="bold")
                label.append("“")
                label.append(one_line(alt.text, 40) or "∅", style="reverse")
                label.append("”")
                label.append(f"  id {alt.token_id}", style="dim")
                if alt.current:
                    label.append("  ← current", style="italic")
                options.append(Option(label, id=str(alt.token_id)))
            yield OptionList(*options, id="alt-list")

    def on_mount(self) -> None:
        self.query_one(OptionList).focus()

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        event.stop()
        self.dismiss(int(event.option.id))

    def action_dismiss_none(self) -> None:
        self.dismiss(None)
