"""Every key binding of the app, with a stable id.

The ids are what a user remaps in the config file (``[keymap]`` table, see
:mod:`steer_tui.ui.config`); Textual applies the keymap through ``App.set_keymap``.
Screens build their ``BINDINGS`` from this table, and the help screen and the command
palette list it, so there is exactly one place that names an action.
"""

from __future__ import annotations

from dataclasses import dataclass

from textual.binding import Binding


@dataclass(frozen=True)
class Key:
    id: str
    keys: str  # Textual key names, comma separated
    action: str
    description: str
    show: bool = False  # show in the footer
    palette: bool = True  # offer in the command palette
    key_display: str | None = None


SESSION_KEYS: tuple[Key, ...] = (
    Key("session.pause", "space", "toggle_pause", "Pause / resume", True, key_display="space"),
    Key("session.correct", "enter,e", "correct", "Correct at cursor", True, key_display="⏎/e"),
    Key("session.alternatives", "tab,a", "alternatives", "Alternatives (pick)", True, key_display="tab/a"),
    Key("session.resample", "r", "resample", "Resample from cursor", True),
    Key("session.prev_branch", "left_square_bracket", "branch(-1)", "Previous sibling branch", False, key_display="["),
    Key("session.next_branch", "right_square_bracket", "branch(1)", "Next sibling branch", False, key_display="]"),
    Key("session.tree", "t", "tree", "Tree view", True),
    Key("session.stats", "s", "stats", "Steer statistics", False),
    Key("session.undo", "u", "undo", "Undo last steer", True),
    Key("session.redo", "U,ctrl+y", "redo", "Redo undone steer", False, key_display="U"),
    Key("session.accept", "d", "accept", "Mark path done (accept)", True),
    Key("session.prob_colors", "p", "prob_colors", "Colour tokens by probability", False),
    Key("session.next_task", "n", "task(1)", "Next task in queue", False),
    Key("session.prev_task", "N", "task(-1)", "Previous task in queue", False),
    Key("session.tasks", "o", "tasks", "Open / new task", False),
    Key("session.adapter", "b", "toggle_adapter", "Adapter on/off for the next continuation", False),
    Key("session.save", "ctrl+s", "save", "Save now", False),
)

CURSOR_KEYS: tuple[Key, ...] = (
    Key("cursor.left", "left", "move(-1)", "Cursor: previous token", palette=False),
    Key("cursor.right", "right", "move(1)", "Cursor: next token", palette=False),
    Key("cursor.word_left", "ctrl+left", "word(-1)", "Cursor: previous word", palette=False),
    Key("cursor.word_right", "ctrl+right", "word(1)", "Cursor: next word", palette=False),
    Key("cursor.up", "up", "line(-1)", "Cursor: line up", palette=False),
    Key("cursor.down", "down", "line(1)", "Cursor: line down", palette=False),
    Key("cursor.page_up", "pageup", "page(-1)", "Cursor: page up", palette=False),
    Key("cursor.page_down", "pagedown", "page(1)", "Cursor: page down", palette=False),
    Key("cursor.home", "home", "home", "Cursor: start of response", palette=False),
    Key("cursor.end", "end", "end", "Cursor: end of response", palette=False),
)

APP_KEYS: tuple[Key, ...] = (
    Key("app.help", "question_mark,f1", "help", "Help: every binding", True, key_display="?"),
    Key("app.quit", "ctrl+q", "quit", "Quit (everything is saved)", True, palette=False),
    Key("app.palette", "ctrl+p", "command_palette", "Command palette", False, palette=False),
)

ALL_KEYS: tuple[Key, ...] = SESSION_KEYS + CURSOR_KEYS + APP_KEYS
KEY_IDS: frozenset[str] = frozenset(k.id for k in ALL_KEYS)


def bindings(keys: tuple[Key, ...], *, priority: bool = False) -> list[Binding]:
    """Textual bindings (with ids) for a group of keys."""
    return [
        Binding(
            k.keys,
            k.action,
            k.description,
            show=k.show,
            key_display=k.key_display,
            id=k.id,
            priority=priority,
        )
        for k in keys
    ]
