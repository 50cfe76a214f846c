"""Make untrusted text (model output, corrections, titles) inert for a terminal.

Control characters (C0, DEL, C1) are what carry ANSI/OSC escape sequences (colours, OSC 52
clipboard writes, OSC 8 hyperlinks, title changes); bidirectional overrides can disguise
text. ``visible`` turns each into a printable escape like ``\\x1b`` so it is shown, never
acted on. Rich markup is a separate concern: the UI never parses model text as markup
(it builds ``rich.text.Text`` objects), and plain-text output needs no escaping of ``[``.
"""

from __future__ import annotations

import re

# C0 controls except tab/newline, DEL, C1 controls, and bidi embedding/override/isolate marks
_UNSAFE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def _escape(m: re.Match[str]) -> str:
    c = m.group(0)
    o = ord(c)
    return f"\\x{o:02x}" if o < 0x100 else f"\\u{o:04x}"


def visible(text: str, *, newlines: bool = True, tabs: bool = True) -> str:
    """``text`` with every control/bidi-override character replaced by a visible escape.
    With ``newlines=False`` a newline is shown as ``⏎`` (one-line views); likewise tabs as ``→``."""
    out = _UNSAFE.sub(_escape, text)
    if not newlines:
        out = out.replace("\n", "⏎")
    if not tabs:
        out = out.replace("\t", "→")
    return out


def is_inert(text: str) -> bool:
    """True if ``text`` holds no character that a terminal would interpret (but \\n and \\t)."""
    return _UNSAFE.search(text) is None
