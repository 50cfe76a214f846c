"""Import direction of the UI room: the CLI layer imports the UI, never the other way
round (not even inside a function), and the pure view models load without textual."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

UI = Path(__file__).resolve().parents[2] / "steer_tui" / "ui"
CLI_LAYER = ("steer_tui.cli", "steer_tui.auto_cli")


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at any depth (function-level imports included)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
    return out


def test_ui_never_imports_the_cli_layer():
    bad = {
        f"{p.relative_to(UI.parent)}: {m}"
        for p in UI.rglob("*.py")
        for m in imported_modules(p)
        if m.startswith(CLI_LAYER)
    }
    assert not bad, f"ui imports the CLI layer: {sorted(bad)}"


def test_pure_view_models_load_without_textual():
    code = (
        "import sys, steer_tui.core.stats, steer_tui.ui.path_model, steer_tui.ui.session_factory;"
        "print([m for m in ('textual', 'torch') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"
