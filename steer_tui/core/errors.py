"""``EngineError``: the one exception the engine layer raises (model files, sampling settings,
prompts and token ids it cannot use). It sits below every engine module so that sampling,
the GGUF reader, the engines and the factory all raise the same type without importing each other."""

from __future__ import annotations

__all__ = ["EngineError"]


class EngineError(Exception):
    """The engine cannot do what was asked (bad model file, prompt too long, bad token id).

    The message is meant for the user: it names the file or argument and what is wrong."""
