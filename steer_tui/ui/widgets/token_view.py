"""The response as a sequence of token pieces with a token cursor.

A Line-API widget: it wraps the pieces to the width once (incrementally while streaming)
and draws only the lines on screen, so a 20,000-token response scrolls as smoothly as a
short one. It knows nothing about sessions or trees: the screen gives it ``Piece``s and
reads ``cursor``; the widget posts ``CursorMoved`` and ``CorrectRequested`` intents.

Cursor positions are *token indexes* into the response (0 .. n_tokens, where n_tokens is
"after the last token"). Pieces that are not tokens of the current path (the struck-through
rejected text of earlier steers) are shown but never selected.
"""

from __future__ import annotations

from rich.cells import cell_len
from rich.segment import Segment
from rich.style import Style
from textual import events
from textual.geometry import Region, Size
from textual.message import Message
from textual.reactive import reactive
from textual.scroll_view import ScrollView
from textual.strip import Strip

from steer_tui.ui.keys import CURSOR_KEYS, bindings
from steer_tui.ui.path_model import Piece
from steer_tui.ui.render import visible
from steer_tui.ui.widgets.prob_colors import PROB_STYLES, prob_bucket

END = -1  # layout key of the end-of-response cell
PENDING = -2  # layout key of the inline correction being typed
NO_KEY = -3  # matches no layout key (no cursor drawn, no pending text)


class TokenView(ScrollView, can_focus=True):
    """Response tokens with a cursor; wraps once, renders only visible lines."""

    BINDINGS = bindings(CURSOR_KEYS)

    COMPONENT_CLASSES = {
        "token-view--cursor",
        "token-view--human",
        "token-view--rejected",
        "token-view--pending",
    }

    DEFAULT_CSS = """
    TokenView {
        scrollbar-gutter: stable;
        padding: 0 1;
    }
    TokenView > .token-view--cursor { background: $accent; color: $text; text-style: bold; }
    TokenView > .token-view--human { color: $success; text-style: underline; }
    TokenView > .token-view--rejected { color: $error 70%; text-style: strike dim; }
    TokenView > .token-view--pending { color: $warning; text-style: bold underline; }
    """

    cursor: reactive[int] = reactive(0, always_update=True, repaint=False)
    """Token index under the cursor (``n_tokens`` = after the last token)."""
    prob_colors: reactive[bool] = reactive(False, repaint=False)
    """Colour every token by the model's probability of it (red unlikely .. green likely)."""
    show_cursor: reactive[bool] = reactive(True, repaint=False)
    """Draw the cursor (hidden while streaming)."""

    class CursorMoved(Message):
        """The cursor moved to token ``index`` (``n_tokens`` = end)."""

        def __init__(self, view: TokenView, index: int) -> None:
            super().__init__()
            self.view = view
            self.index = index

        @property
        def control(self) -> TokenView:
            return self.view

        def can_replace(self, message: Message) -> bool:
            # a held-down arrow key: only the latest position matters
            return isinstance(message, TokenView.CursorMoved) and message.view is self.view

    class CorrectRequested(Message):
        """The user asked to correct at token ``index`` (double click)."""

        def __init__(self, view: TokenView, index: int) -> None:
            super().__init__()
            self.view = view
            self.index = index

    def __init__(self, *, name: str | None = None, id: str | None = None, classes: str | None = None) -> None:
        super().__init__(name=name, id=id, classes=classes)
        self._items: list[Piece] = []
        self._disp: list[str] = []  # visible text per item
        self._tok_item: list[int] = []  # token index -> item index
        self._item_tok: list[int] = []  # item index -> token index (-1: not a token)
        # layout
        self._width = 0
        self._lines: list[list[tuple[int, str]]] = []  # (item key, fragment); "\n" = newline cell
        self._line_item: list[int] = []  # first item index of each line
        self._line_cont: list[bool] = []  # line starts inside an item (or inside pending text)
        self._item_pos: list[tuple[int, int]] = []  # item -> (line, col) of its first cell
        self._end_pos: tuple[int, int] = (0, 0)
        self._pending_at: int | None = None  # token index the pending text is inserted before
        self._pending_text = ""
        self._base_style: Style | None = None
        self._style_cache: dict[tuple, Style] = {}
        self._painted_lines = 0

    # ------------------------------------------------------------------ data in
    @property
    def n_tokens(self) -> int:
        return len(self._tok_item)

    def token_text(self, index: int) -> str:
        return self._items[self._tok_item[index]].text

    def text(self) -> str:
        """The response text (tokens only, no rejected spans)."""
        return "".join(self._items[i].text for i in self._tok_item)

    def set_pieces(self, pieces: list[Piece], *, cursor: int | None = None) -> None:
        """Replace everything (a new path)."""
        self._items = []
        self._disp = []
        self._tok_item = []
        self._item_tok = []
        self._add(pieces)
        self._relayout(0)
        self.set_reactive(TokenView.cursor, self.n_tokens if cursor is None else max(0, min(cursor, self.n_tokens)))
        self._changed()

    def append(self, pieces: list[Piece]) -> None:
        """Add pieces at the end (streaming): only the last line is laid out again."""
        if not pieces:
            return
        start = len(self._items)
        self._add(pieces)
        first = self._relayout(max(0, start - 1))
        self._changed(first)

    def set_pending(self, index: int | None, text: str = "") -> None:
        """Show ``text`` inline before token ``index`` and strike what follows (None: off)."""
        old = self._pending_at
        self._pending_at = None if index is None else max(0, min(index, self.n_tokens))
        self._pending_text = text
        starts = [x for x in (old, self._pending_at) if x is not None]
        if starts:
            item = min(self._item_of_tok(i) for i in starts)
            self._relayout(max(0, item - 1))
            self._changed()

    def _add(self, pieces: list[Piece]) -> None:
        for p in pieces:
            idx = len(self._items)
            self._items.append(p)
            self._disp.append(visible(p.text))
            if p.selectable:
                self._item_tok.append(len(self._tok_item))
                self._tok_item.append(idx)
            else:
                self._item_tok.append(-1)

    def _item_of_tok(self, index: int) -> int:
        return self._tok_item[index] if index < len(self._tok_item) else len(self._items)

    # ------------------------------------------------------------------ layout
    def _wrap_width(self) -> int:
        return max(4, self.scrollable_content_region.width or self.size.width or 80)

    def _relayout(self, from_item: int) -> int:
        """Lay out again from the line holding ``from_item``; returns that line's index."""
        width = self._wrap_width()
        if width != self._width:
            self._width = width
            from_item = 0
        n_items = len(self._items)
        from_item = min(from_item, len(self._item_pos) - 1, n_items - 1)
        if from_item <= 0 or not self._lines:
            line_no, start = 0, 0
        else:
            line_no = self._item_pos[from_item][0]
            while line_no > 0 and self._line_cont[line_no]:
                line_no -= 1
            start = self._line_item[line_no]
        del self._lines[line_no:], self._line_item[line_no:], self._line_cont[line_no:]
        del self._item_pos[start:]

        lines, line_item, line_cont, item_pos = self._lines, self._line_item, self._line_cont, self._item_pos
        cur: list[tuple[int, str]] = []
        col = 0
        cur_first = start
        cur_cont = False
        pending_item = self._item_of_tok(self._pending_at) if self._pending_at is not None else NO_KEY
        disp = self._disp

        def flush(next_item: int, cont: bool) -> None:
            nonlocal cur, col, cur_first, cur_cont
            lines.append(cur)
            line_item.append(cur_first)
            line_cont.append(cur_cont)
            cur, col, cur_first, cur_cont = [], 0, next_item, cont

        def place(key: int, text: str, item_index: int, clean: bool) -> tuple[int, int] | None:
            """Lay out ``text`` for ``key``; return (line, col) of its first cell."""
            nonlocal col
            first: tuple[int, int] | None = None
            parts = text.split("\n")
            for k, part in enumerate(parts):
                while part:
                    w = cell_len(part)
                    if col + w <= width:
                        if first is None:
                            first = (len(lines), col)
                        cur.append((key, part))
                        col += w
                        break
                    if col > 0 and w <= width:
                        flush(item_index, first is not None)
                        continue
                    # longer than the room left: take what fits
                    room = width - col
                    take = 0
                    used = 0
                    for ch in part:
                        cw = cell_len(ch)
                        if used + cw > room:
                            break
                        used += cw
                        take += 1
                    if take == 0:
                        flush(item_index, first is not None)
                        continue
                    if first is None:
                        first = (len(lines), col)
                    cur.append((key, part[:take]))
                    col += used
                    part = part[take:]
                    flush(item_index, True)
                if k < len(parts) - 1:  # a newline: one cell, then a line break
                    if col + 1 > width:
                        flush(item_index, first is not None)
                    if first is None:
                        first = (len(lines), col)
                    cur.append((key, "\n"))
                    if clean and k == len(parts) - 2 and not parts[-1]:
                        flush(item_index + 1, False)  # the item ends here: a clean line start
                    else:
                        flush(item_index, True)
            return first

        for idx in range(start, n_items + 1):
            if idx == pending_item:
                place(PENDING, visible(self._pending_text) + "\u258f", idx, False)
            if idx == n_items:
                self._end_pos = place(END, " ", idx, False) or (len(lines), col)
                break
            text = disp[idx]
            if "\n" not in text:  # fast path: most tokens simply fit on the line
                w = cell_len(text)
                if w and col + w <= width:
                    item_pos.append((len(lines), col))
                    cur.append((idx, text))
                    col += w
                    continue
            pos = place(idx, text, idx, True)
            item_pos.append(pos if pos is not None else (len(lines), col))
        if cur or not lines:
            flush(n_items, False)
        self.virtual_size = Size(width, len(lines))
        return line_no

    def _changed(self, from_line: int = 0) -> None:
        """Repaint the visible lines from ``from_line`` down (all of them by default)."""
        top = self.scroll_offset.y
        height = self.scrollable_content_region.height
        n_lines = len(self._lines)
        if from_line <= top or not height or n_lines < self._painted_lines:
            self.refresh()  # something above or a shrink: repaint everything visible
        elif from_line < top + height:
            bottom = min(top + height, n_lines)
            self.refresh(Region(0, from_line - top, self.size.width, max(1, bottom - from_line)))
        self._painted_lines = n_lines

    def on_resize(self, event: events.Resize) -> None:
        if self._wrap_width() != self._width:
            self._relayout(0)
            self.refresh()
            self.call_after_refresh(self.scroll_to_cursor, False)

    # ------------------------------------------------------------------ rendering
    def render_line(self, y: int) -> Strip:
        scroll_x, scroll_y = self.scroll_offset
        line_no = scroll_y + y
        width = self.scrollable_content_region.width
        base = self._base_style
        if base is None:
            base = self._base_style = self.rich_style
        if line_no >= len(self._lines):
            return Strip.blank(width, base)
        cursor_item = self._item_of_tok(self.cursor) if self.show_cursor else NO_KEY
        if cursor_item == len(self._items):
            cursor_item = END
        segments = []
        for key, frag in self._lines[line_no]:
            style = self._cached_style(key, key == cursor_item, base)
            if frag == "\n":
                frag = "\u21b5" if key == cursor_item else " "
            segments.append(Segment(frag, style))
        strip = Strip(segments)
        return strip.crop_extend(scroll_x, scroll_x + width, base)

    def _cached_style(self, key: int, at_cursor: bool, base: Style) -> Style:
        # styles depend on a few facts about the item only: cache the combined Style per kind
        if key >= 0:
            item = self._items[key]
            struck = self._pending_at is not None and self._item_tok[key] >= self._pending_at
            sig = (item.author, prob_bucket(item.logprob) if self.prob_colors else None, struck, at_cursor)
        else:
            sig = (key, None, False, at_cursor)
        style = self._style_cache.get(sig)
        if style is None:
            style = self._style_cache[sig] = base + self._style_for(key, at_cursor)
        return style

    def notify_style_update(self) -> None:
        self._base_style = None
        self._style_cache = {}
        super().notify_style_update()

    def _style_for(self, key: int, at_cursor: bool) -> Style:
        if key == PENDING:
            return self.get_component_rich_style("token-view--pending")
        style = Style()
        if key >= 0:
            item = self._items[key]
            if item.author == "rejected":
                style = self.get_component_rich_style("token-view--rejected")
            else:
                if self.prob_colors:
                    b = prob_bucket(item.logprob)
                    if b is not None:
                        style = PROB_STYLES[b]
                if item.author == "human":
                    human = self.get_component_rich_style("token-view--human")
                    style = (human + style) if self.prob_colors else human
            if self._pending_at is not None and self._item_tok[key] >= self._pending_at >= 0:
                style = style + self.get_component_rich_style("token-view--rejected")
        if at_cursor:
            style = style + self.get_component_rich_style("token-view--cursor")
        return style

    def watch_prob_colors(self) -> None:
        self.refresh()

    def watch_show_cursor(self) -> None:
        self.refresh()

    # ------------------------------------------------------------------ cursor
    def validate_cursor(self, value: int) -> int:
        return max(0, min(int(value), self.n_tokens))

    def watch_cursor(self, value: int) -> None:
        self.refresh()
        self.scroll_to_cursor()
        self.post_message(self.CursorMoved(self, value))

    def cursor_position(self) -> tuple[int, int]:
        """(line, column) of the cursor cell in the laid-out text."""
        item = self._item_of_tok(self.cursor)
        if item >= len(self._item_pos):
            return self._end_pos
        return self._item_pos[item]

    def scroll_to_cursor(self, animate: bool = False) -> None:
        line, _ = self.cursor_position()
        height = self.scrollable_content_region.height or 1
        top = self.scroll_offset.y
        if line < top:
            self.scroll_to(y=line, animate=animate, immediate=True)
        elif line >= top + height:
            self.scroll_to(y=line - height + 1, animate=animate, immediate=True)

    def scroll_to_end(self) -> None:
        self.scroll_to(y=max(0, len(self._lines) - (self.scrollable_content_region.height or 1)), animate=False, immediate=True)

    def _is_word_start(self, index: int) -> bool:
        if index <= 0 or index >= self.n_tokens:
            return True
        text = self.token_text(index)
        prev = self.token_text(index - 1)
        if not text:
            return False
        if text[0].isspace():
            return not prev or not prev[-1].isspace() or text.strip() != ""
        return bool(prev) and (prev[-1].isspace() or (prev[-1].isalnum() != text[0].isalnum()))

    def _skip_empty(self, index: int, step: int) -> int:
        # tokens that hold back an incomplete UTF-8 character have no text: step over them
        while 0 < index < self.n_tokens and not self.token_text(index):
            index += step
        return max(0, min(index, self.n_tokens))

    def action_move(self, step: int) -> None:
        self.cursor = self._skip_empty(self.cursor + step, 1 if step > 0 else -1)

    def action_word(self, step: int) -> None:
        i = self.cursor + step
        while 0 < i < self.n_tokens and not self._is_word_start(i):
            i += step
        self.cursor = self._skip_empty(i, step)

    def action_home(self) -> None:
        self.cursor = 0

    def action_end(self) -> None:
        self.cursor = self.n_tokens

    def action_line(self, step: int) -> None:
        line, col = self.cursor_position()
        self.cursor = self._token_near(line + step, col, step)

    def action_page(self, step: int) -> None:
        line, col = self.cursor_position()
        height = max(1, (self.scrollable_content_region.height or 2) - 1)
        target = max(0, min(len(self._lines) - 1, line + step * height))
        self.cursor = self._token_near(target, col, step)

    def _token_near(self, line: int, col: int, step: int) -> int:
        """The token whose cells cover ``col`` on ``line`` (searching further in ``step``)."""
        while 0 <= line < len(self._lines):
            best = None
            c = 0
            for key, frag in self._lines[line]:
                w = 1 if frag == "\n" else cell_len(frag)
                if key == END:
                    tok = self.n_tokens
                elif key >= 0 and self._item_tok[key] >= 0:
                    tok = self._item_tok[key]
                else:
                    c += w
                    continue
                if best is None or c <= col:
                    best = tok
                if c <= col < c + w:
                    break
                c += w
            if best is not None:
                return best
            line += step
        return 0 if line < 0 else self.n_tokens

    def token_at_offset(self, x: int, y: int) -> int | None:
        """Token index at a content offset (mouse)."""
        line = y + self.scroll_offset.y
        if not 0 <= line < len(self._lines):
            return None
        c = 0
        x += self.scroll_offset.x
        for key, frag in self._lines[line]:
            w = 1 if frag == "\n" else cell_len(frag)
            if c <= x < c + w:
                if key == END:
                    return self.n_tokens
                if key >= 0 and self._item_tok[key] >= 0:
                    return self._item_tok[key]
                return None
            c += w
        return None

    def on_click(self, event: events.Click) -> None:
        offset = event.get_content_offset(self)
        if offset is None:
            return
        tok = self.token_at_offset(offset.x, offset.y)
        if tok is None:
            return
        self.cursor = tok
        if event.chain >= 2:
            self.post_message(self.CorrectRequested(self, tok))

    # ------------------------------------------------------------------ introspection (tests)
    def visible_lines(self) -> list[str]:
        """The laid-out lines as plain text (tests, debugging)."""
        return ["".join(" " if f == "\n" else f for _, f in line) for line in self._lines]

    def line_count(self) -> int:
        return len(self._lines)


__all__ = ["TokenView"]
