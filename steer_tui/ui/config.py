"""App configuration: a TOML file in the platform config dir, overridable by env.

``$STEER_CONFIG`` names the file (default ``platformdirs.user_config_dir("steer-tui")/config.toml``).
A missing file means defaults. Example::

    annotator = "alice"
    prob_colors = false          # start with probability colouring on?
    top_k = 10                   # alternatives shown by tab (at most what the engine captured)
    extra_bufts = "auto"         # llama.cpp extra buffer types (AMX, repacking): auto | on | off

    [keymap]                     # binding id -> keys (comma separated Textual key names)
    "session.pause" = "space,ctrl+space"
    "session.undo" = "z"

    [sampling]                   # defaults for new tasks (SPEC sampling fields)
    temperature = 0.7
    max_tokens = 256

Binding ids are listed by the help screen (``?``) and in docs/app.md.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import platformdirs

from steer_tui.core.llama_load import SETTINGS
from steer_tui.ui.keys import KEY_IDS

SAMPLING_KEYS = ("temperature", "top_p", "top_k", "min_p", "repeat_penalty", "seed", "max_tokens")
_TOP_LEVEL = {"annotator", "prob_colors", "top_k", "keymap", "sampling", "extra_bufts"}


class ConfigError(ValueError):
    """The config file is unreadable or has a bad entry; the message names file and key."""


@dataclass
class UIConfig:
    keymap: dict[str, str] = field(default_factory=dict)
    """Binding id -> comma separated keys, applied with ``App.set_keymap``."""
    sampling: dict[str, Any] = field(default_factory=dict)
    """Sampling defaults for new tasks (overridden by --temperature / --seed)."""
    annotator: str | None = None
    """Written into human nodes; default: $STEER_ANNOTATOR or the login name."""
    prob_colors: bool = False
    """Start with probability colouring on."""
    top_k: int = 10
    """How many alternatives the alternatives popup lists (at most what was captured)."""
    extra_bufts: str | None = None
    """llama.cpp extra buffer types: "auto" (probe once per CPU), "on" or "off"; None = not set
    here (``--extra-bufts`` and ``$STEER_SETTINGS`` win over it)."""
    path: Path | None = None
    """The file this config was read from (None: defaults)."""


def default_config_path() -> Path:
    env = os.environ.get("STEER_CONFIG")
    if env:
        return Path(env).expanduser()
    return Path(platformdirs.user_config_dir("steer-tui")) / "config.toml"


def _default_annotator() -> str | None:
    name = os.environ.get("STEER_ANNOTATOR")
    if name:
        return name
    try:
        import getpass

        return getpass.getuser()
    except (KeyError, OSError):  # no login name in some containers (no passwd entry)
        return None


def load_config(path: str | os.PathLike[str] | None = None) -> UIConfig:
    """Read the config file (``path`` or :func:`default_config_path`); missing = defaults."""
    p = Path(path).expanduser() if path is not None else default_config_path()
    cfg = UIConfig(annotator=_default_annotator())
    if not p.exists():
        return cfg
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {str(p)!r} is not valid TOML: {exc}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {str(p)!r} cannot be read: {exc}") from None
    cfg.path = p
    return apply_config_dict(cfg, data, source=str(p))


def apply_config_dict(cfg: UIConfig, data: dict[str, Any], *, source: str = "<config>") -> UIConfig:
    """Validate ``data`` (a parsed TOML document) into ``cfg``; errors name source and key."""

    def bad(key: str, what: str) -> ConfigError:
        return ConfigError(f"config file {source!r}: {key}: {what}")

    unknown = set(data) - _TOP_LEVEL
    if unknown:
        raise bad(sorted(unknown)[0], f"unknown setting (known: {', '.join(sorted(_TOP_LEVEL))})")
    keymap = data.get("keymap", {})
    if not isinstance(keymap, dict):
        raise bad("keymap", "must be a table of binding id = \"keys\"")
    for bid, keys in keymap.items():
        if bid not in KEY_IDS:
            raise bad(f"keymap.{bid}", "unknown binding id (see the help screen, ?, for the ids)")
        if not isinstance(keys, str) or not keys.strip():
            raise bad(f"keymap.{bid}", "must be a non-empty string of comma separated keys")
        cfg.keymap[bid] = keys.replace(" ", "")
    sampling = data.get("sampling", {})
    if not isinstance(sampling, dict):
        raise bad("sampling", "must be a table")
    for key, value in sampling.items():
        if key not in SAMPLING_KEYS:
            raise bad(f"sampling.{key}", f"unknown sampling field (known: {', '.join(SAMPLING_KEYS)})")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad(f"sampling.{key}", "must be a number")
        cfg.sampling[key] = value
    if "annotator" in data:
        if not isinstance(data["annotator"], str):
            raise bad("annotator", "must be a string")
        cfg.annotator = data["annotator"]
    if "prob_colors" in data:
        if not isinstance(data["prob_colors"], bool):
            raise bad("prob_colors", "must be true or false")
        cfg.prob_colors = data["prob_colors"]
    if "extra_bufts" in data:
        if data["extra_bufts"] not in SETTINGS:
            raise bad("extra_bufts", f"must be one of {', '.join(repr(v) for v in SETTINGS)}")
        cfg.extra_bufts = data["extra_bufts"]
    if "top_k" in data:
        v = data["top_k"]
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise bad("top_k", "must be a positive integer")
        cfg.top_k = v
    return cfg
