"""The correction editor and the bar that holds it: a one-line input whose value is
exactly what the user typed.

ctrl+j inserts a real newline into the value; the editor *draws* each newline as ``↵``
(one cell, like the newline it stands for, so cursor positions line up). The glyph is
display only: a typed ``↵`` stays a ``↵``, a newline stays a newline.
"""

from __future__ import annotations

from dataclasses import dataclass

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal
from textual.message import Message
from textual.widgets import Input, Static

NEWLINE_GLYPH = "\u21b5"  # how a newline in the value is drawn (never read back)


class CorrectionInput(Input):
    """The correction editor. enter submits, escape cancels, ctrl+j inserts a newline."""

    BINDINGS = [
        Binding("escape", "cancel", "Cancel", show=True, id="correction.cancel"),
        Binding("ctrl+j", "newline", "Newline", show=True, key_display="^j", id="correction.newline"),
    ]

    class Cancelled(Message):
        """The user left the editor without submitting."""

    def action_cancel(self) -> None:
        self.post_message(self.Cancelled())

    def action_newline(self) -> None:
        self.insert_text_at_cursor("\n")

    @property
    def _value(self) -> Text:
        """The value as drawn (Input's own rendering hook): newlines shown as ``↵``."""
        text = Text(self.value.replace("\n", NEWLINE_GLYPH), no_wrap=True, overflow="ignore", end="")
        if self.highlighter is not None:
            text = self.highlighter(text)
        return text


class CorrectionBar(Horizontal):
    """The bar that holds the editor while a correction is typed at token ``at``. Posts
    ``Changed`` as the text changes, then ``Submitted`` or ``Cancelled``."""

    @dataclass
    class Changed(Message):
        at: int
        text: str

    @dataclass
    class Submitted(Message):
        at: int
        text: str  # exactly what was typed

    class Cancelled(Message):
        """The editor was left without submitting."""

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.at: int | None = None
        """Token index the open correction goes to (None: the bar is closed)."""

    def compose(self) -> ComposeResult:
        yield Static("", id="correction-label")
        yield CorrectionInput(placeholder="type the correction, enter submits, esc cancels", id="correction")

    def open(self, at: int, label: str) -> None:
        """Show the bar, empty, for a correction at ``at``, and focus the editor."""
        self.at = at
        self.display = True
        self.query_one("#correction-label", Static).update(Text(f" {label} › ", style="bold"))
        editor = self.query_one(CorrectionInput)
        editor.value = ""
        editor.focus()

    def close(self) -> None:
        self.at = None
        self.display = False

    @on(Input.Changed, "#correction")
    def _changed(self, event: Input.Changed) -> None:
        event.stop()
        if self.at is not None:
            self.post_message(self.Changed(self.at, event.value))

    @on(Input.Submitted, "#correction")
    def _submitted(self, event: Input.Submitted) -> None:
        event.stop()
        if self.at is not None:
            self.post_message(self.Submitted(self.at, event.value))

    @on(CorrectionInput.Cancelled)
    def _cancelled(self, event: CorrectionInput.Cancelled) -> None:
        event.stop()
        self.post_message(self.Cancelled())
