"""One-line bars: the status bar (model, speed, context, steers, save state) and the
cursor info line (the token under the cursor, its probability and rank)."""

from __future__ import annotations

from rich.text import Text
from textual.reactive import reactive
from textual.widget import Widget

from steer_tui.ui.render import one_line


class StatusBar(Widget):
    """Model, tokens/s, context used/limit, steers, task progress, save state."""

    DEFAULT_CSS = """
    StatusBar { height: 1; background: $panel; color: $text; }
    """

    model: reactive[str] = reactive("", layout=False)
    """Model name, with the adapter's file name after a plus sign when one is on."""
    state: reactive[str] = reactive("")
    """What the session is doing: loading, streaming, paused, editing, ended (eos), ..."""
    tokens_per_s: reactive[float] = reactive(0.0)
    """Generation speed of the current (or last) stream."""
    ctx_used: reactive[int] = reactive(0)
    """Tokens in the context: prompt + current path."""
    ctx_limit: reactive[int] = reactive(0)
    """The engine's n_ctx."""
    steers: reactive[int] = reactive(0)
    """Active (not undone) steers in this task."""
    task: reactive[str] = reactive("")
    """Queue progress ("task 3/12") or empty."""
    save_state: reactive[str] = reactive("")
    """"saved", "unsaved" or "save failed: ..." (the data stays in memory and is retried)."""

    def render(self) -> Text:
        # most important first; the model name takes whatever width is left
        t = Text(no_wrap=True, overflow="ellipsis")
        t.append(f" {self.state or '…'} ", style="bold reverse")
        if self.task:
            t.append(f" {self.task}", style="bold")
        t.append(f" │ steers {self.steers}")
        if self.save_state:
            style = "bold red" if self.save_state.startswith("save failed") else ""
            t.append(" │ ")
            t.append(one_line(self.save_state, 60), style=style)
        if self.ctx_limit:
            t.append(f" │ ctx {self.ctx_used}/{self.ctx_limit}")
        if self.tokens_per_s:
            t.append(f" │ {self.tokens_per_s:.1f} tok/s")
        t.append(" │ ")
        t.append(one_line(self.model, 60), style="italic")
        return t


class CursorInfo(Widget):
    """The token under the cursor: index, text, probability and rank."""

    DEFAULT_CSS = """
    CursorInfo { height: 1; color: $text-muted; background: $boost; }
    """

    info: reactive[Text | str] = reactive("")
    """What to show (a Text built by the screen; user text inside is already escaped)."""

    def render(self) -> Text:
        info = self.info
        if isinstance(info, Text):
            info = info.copy()
            info.no_wrap = True
            info.overflow = "ellipsis"
            return info
        return Text(info, no_wrap=True, overflow="ellipsis")
