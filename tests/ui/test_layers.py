"""The UI room's pure view models load without textual (the import direction itself is
import-linter's contract: tests/test_architecture.py)."""

from __future__ import annotations

import subprocess
import sys


def test_pure_view_models_load_without_textual():
    code = (
        "import sys, steer_tui.core.stats, steer_tui.ui.path_model, steer_tui.ui.session_factory;"
        "print([m for m in ('textual', 'torch') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"
