"""The correction editor: a one-line input whose value is exactly what the user typed.

ctrl+j inserts a real newline into the value; the editor *draws* each newline as ``↵``
(one cell, like the newline it stands for, so cursor positions line up). The glyph is
display only: a typed ``↵`` stays a ``↵``, a newline stays a newline.
"""

from __future__ import annotations

from rich.text import Text
from textual.binding import Binding
from textual.message import Message
from textual.widgets import Input

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
