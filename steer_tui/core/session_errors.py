"""The errors a ``Session`` raises, apart from the session itself so that its setup helpers
(``session_setup``) raise the same types without importing the session."""

from __future__ import annotations

from steer_tui.core.errors import EngineError
from steer_tui.core.store import StoreError
from steer_tui.core.tree import TreeError

__all__ = [
    "ModelMismatch",
    "ModelMismatchWarning",
    "SaveError",
    "SessionBusy",
    "SessionError",
    "SessionErrors",
]


class SessionError(Exception):
    """A session operation is not possible now (clear message for the user)."""


class SessionBusy(SessionError):
    """A generation is running; pause it (set the stop event) before changing the tree."""


class ModelMismatch(SessionError):
    """The tree was made with a model whose vocabulary differs: its token ids are meaningless here."""


class ModelMismatchWarning(UserWarning):
    """The model file differs from the tree's (same vocabulary): continuing is allowed."""


class SaveError(SessionError):
    """Saving failed (disk full, permission...). The in-memory state is intact; retry with save()."""


#: Every error a Session call can raise for bad input or state, for callers that catch them
#: all without importing the store, tree and engine modules.
SessionErrors = (SessionError, StoreError, TreeError, EngineError)
