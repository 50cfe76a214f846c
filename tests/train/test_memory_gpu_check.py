"""bench/gpu_check.py --dry-run runs on the CPU (tiny sizes) and prints its whole table, so the
script a GPU box will run is known to work end to end."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("peft")

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_check_dry_run():
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--dry-run"], env=env,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    steps = [ln for ln in out.splitlines() if ln.startswith("| 512 |") or ln.startswith("| 1,024 |")]
    assert len(steps) == 8  # 2 vocabularies x 2 token budgets x tree/linear
    assert all("OOM" not in ln for ln in steps)
    tree = [ln for ln in steps if "| tree |" in ln]
    lin = [ln for ln in steps if "| none |" in ln]
    # the linearized layout forwards more tokens for the same sequences
    assert all(int(a.split("|")[4].replace(",", "")) < int(b.split("|")[4].replace(",", "")) for a, b in zip(tree, lin))
    assert out.count("SDPA kernel with the ancestor mask") == 2 and "| ? |" not in out
    flex = [ln for ln in out.splitlines() if ln.startswith("| FlexAttention vs SDPA")]
    assert len(flex) == 2 and not any("failed" in ln for ln in flex)
    assert all(float(ln.split("max |out diff| ")[1].split()[0].rstrip("|,")) < 1e-4 for ln in flex)
