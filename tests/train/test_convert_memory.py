"""bench/convert_memory.py --dry-run: every phase runs in its child and the table comes out.

A smoke test: the ratios are benchmark figures (docs/training.md), never asserted here."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "bench" / "convert_memory.py"
PHASES = ("transformers from_pretrained(gguf_file=)", "steer-train convert_gguf", "steer-train load_model")


def test_dry_run_prints_the_table_with_finite_positive_ratios(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    r = subprocess.run([sys.executable, str(BENCH), "--dry-run", "--workdir", str(tmp_path)],
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout
    assert "bf16 size" in out and "converted cache" in out, out
    rows = [ln for ln in out.splitlines() if ln.startswith("| ") and not ln.startswith("| phase")]
    assert [next(p for p in PHASES if p in row) for row in rows] == list(PHASES), out
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        net, ratio, anon_ratio = float(cells[2]), float(cells[3]), float(cells[5])
        assert math.isfinite(ratio) and ratio > 0 and net > 0, row
        assert math.isfinite(anon_ratio) and anon_ratio >= 0, row


def test_a_sharded_conversion_loads_exactly_the_dequantized_weights(tmp_path, monkeypatch):
    """Small shards (an index and several files) read back through load_model (pread) equal
    iter_weights' values, and transformers' own (mapped) loading of the same directory."""
    import torch
    from transformers import AutoModelForCausalLM

    from steer_tui.core.store import file_sha256
    from train import gguf_weights as W
    from train.gguf_config import build_config
    from train.gguf_model import read_meta
    from train.modeling import ModelSource, load_model

    sys.path.insert(0, str(REPO / "bench"))
    import convert_memory

    gguf = tmp_path / "m.gguf"
    convert_memory.write_gguf(gguf, dict(hidden=64, layers=2, ff=128, heads=4, kv_heads=2, vocab=512))
    meta = read_meta(gguf)
    want = {hf: torch.from_numpy(w.copy()) for hf, w in W.iter_weights(meta, build_config(meta))}
    monkeypatch.setenv("STEER_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(W.write_hf_model, "__defaults__", (64 << 10,))  # 64 KiB shards
    model, _, where = load_model(ModelSource("gguf", str(gguf), file_sha256(gguf)))
    assert len(list(Path(where).glob("model-*-of-*.safetensors"))) > 2
    assert (Path(where) / "model.safetensors.index.json").is_file()
    got = model.state_dict()
    assert set(got) == set(want)
    assert all(got[k].dtype == torch.float32 and torch.equal(got[k], want[k]) for k in want)
    mapped = AutoModelForCausalLM.from_pretrained(str(where), dtype=torch.float32).state_dict()
    assert all(torch.equal(mapped[k], got[k]) for k in want)
    assert model.name_or_path == str(where)
    bf16, _, _ = load_model(ModelSource("gguf", str(gguf), file_sha256(gguf)), dtype=torch.bfloat16)
    assert all(torch.equal(v, want[k].to(torch.bfloat16)) for k, v in bf16.state_dict().items())
