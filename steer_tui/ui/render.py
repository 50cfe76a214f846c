"""Turn model and user text into something safe to draw.

Model output and corrections are *data*: they may contain Rich markup (``[bold]``,
``[link=...]``), ANSI/OSC escape sequences, carriage returns or bidi overrides. Nothing
here ever parses markup; every control character is replaced by a visible stand-in, so
what the user sees is exactly which bytes the model wrote.
"""

from __future__ import annotations

from functools import lru_cache

from steer_tui.core import safe_text as _core
from steer_tui.core.tasks import TITLE_MAX_CHARS


@lru_cache(maxsize=65536)
def visible(text: str) -> str:
    """``text`` with every control character made visible (``\\x1b`` for ESC, ``→`` for a
    tab, so each character is one printable cell or more); newlines are kept for layout."""
    return _core.visible(text, newlines=True, tabs=False)


def one_line(text: str, limit: int | None = None) -> str:
    """A single visible line (newlines shown as ↵), cut to ``limit`` characters."""
    s = visible(text).replace("\n", "\u21b5")
    if limit is not None and len(s) > limit:
        s = s[: max(0, limit - 1)] + "…"
    return s


def title_line(title: str) -> str:
    """A task title as one visible line, as long as a title may be (``TITLE_MAX_CHARS``;
    a file written elsewhere may hold a longer one)."""
    return one_line(title, TITLE_MAX_CHARS)
