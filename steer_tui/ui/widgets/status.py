"""One-line bars: the status bar (model, speed, context, steers, save state) and the
cursor info line (the token under the cursor, its probability and rank), the prompt
line, and the text each of them shows."""

from __future__ import annotations

import math
import time
from typing import Any

from rich.text import Text
from textual.reactive import reactive
from textual.widget import Widget

from steer_tui.core.engine_base import Engine
from steer_tui.core.sampling import rank_of
from steer_tui.core.token_view import TokenInfo
from steer_tui.ui.render import one_line

STATUS_SECONDS = 0.5  # tokens/s and context in the status bar while streaming


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

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self._stream_t0 = 0.0
        self._stream_n = 0
        self._shown_at = 0.0

    def stream_started(self) -> None:
        """A generation starts: tokens/s counts from now."""
        self._stream_t0 = time.perf_counter()
        self._stream_n = 0

    def streamed(self, n: int, ctx_used: int, *, final: bool = False) -> None:
        """``n`` more tokens arrived (``ctx_used`` in the context now). Speed and context are
        shown at most every ``STATUS_SECONDS`` (numbers nobody reads 30 times a second),
        and once more when the stream ends (``final``)."""
        self._stream_n += n
        now = time.perf_counter()
        if not final and now - self._shown_at < STATUS_SECONDS:
            return
        if not final:
            self._shown_at = now
        dt = now - self._stream_t0
        if dt > 0:
            self.tokens_per_s = self._stream_n / dt
        self.ctx_used = ctx_used

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


def cursor_text(tok: TokenInfo | None, *, busy: str = "", n_tokens: int = 0, after_eos: bool = False) -> Text:
    """The cursor info line: what the model is busy with (``busy``), or the token under the
    cursor (``tok``: index, text, probability, rank, node), or, with ``tok`` None, the end of
    the response (``after_eos``: the model ended it) and what the keys do there."""
    t = Text()
    if busy:
        t.append(busy, style="italic")
    elif tok is None:
        t.append(f" end of response ({n_tokens} tokens)", style="bold")
        if after_eos:
            t.append("  the model ended here: enter/tab replace the end-of-turn token, r resamples, d accepts")
        else:
            t.append("  enter: append text  tab: choose the next token  space: continue")
    else:
        t.append(f" #{tok.index} ", style="bold")
        t.append("“")
        t.append(one_line(tok.text, 30), style="reverse")
        t.append("”")
        if tok.logprob is not None:
            t.append(f"  p={math.exp(tok.logprob):.1%}")
            if tok.top:
                rank = rank_of(tok.top, tok.id)
                t.append(f"  rank {rank if rank is not None else '>' + str(len(tok.top))}")
        t.append(f"  {tok.author}/{tok.kind} {tok.node_id}", style="dim")
    return t


def prompt_line(tree: Any) -> Text:
    """The prompt bar: the task's title (unless the prompt starts with it) and the last user
    message (or the raw prompt text), on one line."""
    prompt = tree.prompt
    msgs = prompt.get("messages") or []
    text = next((m["content"] for m in reversed(msgs) if m.get("role") == "user"), None) or prompt.get("text", "")
    line = Text(no_wrap=True, overflow="ellipsis")
    title = tree.title or tree.id
    if not " ".join(text.split()).startswith(title.rstrip("…")):
        line.append(" " + one_line(title, 40) + " ", style="bold reverse")
        line.append(" ")
    line.append("› ", style="bold")
    line.append(one_line(text, 300))
    return line


def model_label(engine: Engine) -> str:
    """The model's name for the status bar, with the adapter's file name when one is loaded
    (and whether it is on)."""
    name = engine.name
    loaded = engine.loaded_adapter
    if loaded:
        adapter = str(loaded.get("path", "adapter")).rsplit("/", 1)[-1]
        name += f" + {adapter}" if engine.adapter_enabled else f" ({adapter} off)"
    return name
