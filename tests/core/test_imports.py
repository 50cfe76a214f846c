"""The core's import structure: every core module imports without textual, torch,
transformers or peft (and, apart from the llama.cpp backend, without llama.cpp); core never
imports the UI or the CLI layer; and no two core modules import each other, directly or
through others, at the top of a file or inside a function."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

CORE = Path(__file__).resolve().parents[2] / "steer_tui" / "core"
MODULES = sorted(p.stem for p in CORE.glob("*.py") if p.stem != "__init__")
#: modules whose job is to talk to llama.cpp (they import it, lazily where they can)
LLAMA_MODULES = {"llama_engine"}


def _imports(path: Path) -> set[str]:
    """Every steer_tui module a file imports, wherever the import statement is."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("steer_tui"):
            names = [f"{node.module}.{a.name}" for a in node.names]
            out.update(n if n.removeprefix("steer_tui.core.") in MODULES else node.module for n in names)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("steer_tui"))
    return out


def test_core_never_imports_ui_or_cli():
    for name in MODULES:
        bad = sorted(m for m in _imports(CORE / f"{name}.py") if not m.startswith("steer_tui.core") and m != "steer_tui")
        assert not bad, f"steer_tui.core.{name} imports {bad}"


def test_no_import_circles_in_core():
    graph = {
        name: {m.removeprefix("steer_tui.core.") for m in _imports(CORE / f"{name}.py") if m.startswith("steer_tui.core.")}
        for name in MODULES
    }
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [node, nxt] if nxt in stack else [node, nxt]
                pytest.fail("import circle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, stack + [node])
        state[node] = 2

    for name in MODULES:
        if name not in state:
            visit(name, [])


def test_core_modules_import_without_ui_torch_or_llama():
    code = (
        "import importlib, sys\n"
        f"for m in {MODULES!r}:\n"
        f"    if m not in {sorted(LLAMA_MODULES)!r}:\n"
        "        importlib.import_module('steer_tui.core.' + m)\n"
        "import steer_tui.auto_cli\n"
        "print(','.join(m for m in ('textual', 'torch', 'transformers', 'peft', 'llama_cpp') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == ""
