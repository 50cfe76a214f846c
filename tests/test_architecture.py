"""The rooms and the one-way flow between them (docs/architecture.md), checked two ways:

- import-linter's contracts in pyproject.toml (``[tool.importlinter]``): cli -> ui -> core,
  train -> core's data and model-file helpers only, no import circles between the modules of a
  package, no torch in the app, no textual in core or train, llama_cpp only in the backend. It
  reads every import statement, including those inside functions.
- every module of ``steer_tui.core`` and of ``train`` imported in a fresh interpreter: what it
  really pulls into ``sys.modules`` (an import made through a dependency or ``importlib`` that
  no static reading sees).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _modules(package: str) -> list[str]:
    base = ROOT / package.replace(".", "/")
    return [f"{package}.{p.stem}" for p in sorted(base.glob("*.py")) if p.stem not in ("__init__", "__main__")]


def test_import_contracts_hold():
    lint = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or shutil.which("lint-imports")
    assert lint, "lint-imports is not installed (it is in the [dev] extra: pip install -e '.[dev]')"
    res = subprocess.run([lint, "--no-logo", "--no-cache"], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]


def _first_importer(modules: list[str], banned: tuple[str, ...]) -> dict[str, str]:
    """For each banned package that got imported: the first of ``modules`` (imported in
    order, in one fresh interpreter) after which it was in ``sys.modules``."""
    code = (
        "import importlib, sys\n"
        f"found = {{}}\n"
        f"for m in {modules!r}:\n"
        "    importlib.import_module(m)\n"
        f"    for b in {banned!r}:\n"
        "        if b in sys.modules and b not in found:\n"
        "            found[b] = m\n"
        "print(repr(found))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    return eval(res.stdout.strip())  # a dict literal printed by the child


def test_core_modules_pull_no_ui_torch_or_llama():
    llama = {"steer_tui.core.llama_engine"}  # its job is to talk to llama.cpp
    core = [m for m in _modules("steer_tui.core") if m not in llama] + ["steer_tui.auto_cli"]
    assert _first_importer(core, ("textual", "torch", "transformers", "peft", "llama_cpp")) == {}


def test_train_modules_pull_no_textual():
    assert _first_importer(_modules("train"), ("textual",)) == {}
