"""steer: steer a local LLM token by token and capture every correction as training data."""

from __future__ import annotations

__all__ = ["Session", "SteerTree"]
__version__ = "0.1.0"


def __getattr__(name: str):  # lazy: importing the package must not load llama.cpp
    if name == "Session":
        from steer_tui.core.session import Session

        return Session
    if name == "SteerTree":
        from steer_tui.core.tree import SteerTree

        return SteerTree
    raise AttributeError(name)
