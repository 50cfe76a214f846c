"""``steer-tui doctor``: a full report with a real self-test, and a non-zero exit naming each
problem with its fix (broken store, missing model, a crashing llama.cpp)."""

from __future__ import annotations

import signal
import sys

from steer_tui.core import doctor
from steer_tui.core.llama_load import run_probe
from tests.reliability.conftest import run_cli


def test_doctor_reports_everything_and_passes_here(tmp_path):
    proc = run_cli("doctor", "--store", str(tmp_path / "store"), timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    for section in ("[versions]", "[llama.cpp]", "[model]", "[store]", "[self-test]"):
        assert section in out
    assert "extra buffer types  " in out and "AMX " in out and "system info" in out
    assert "SmolLM2-135M-Instruct.Q4_1.gguf" in out
    assert f"will be created under {tmp_path}" in out  # the store does not exist yet
    assert "stream              ok: " in out
    assert out.rstrip().endswith("no problems found")


def test_doctor_exit_code_with_a_broken_store(tmp_path):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    proc = run_cli("doctor", "--store", str(not_a_dir / "store"), "--extra-bufts", "off", timeout=180)
    assert proc.returncode == 1
    assert f"writable            PROBLEM {not_a_dir} is a file, so {not_a_dir / 'store'} cannot be created" in proc.stdout
    assert "fix: pass --store DIR with a directory path" in proc.stdout
    assert "1 problem found" in proc.stdout
    proc = run_cli("doctor", "--store", str(not_a_dir), "--extra-bufts", "off", timeout=180)
    assert proc.returncode == 1 and "is a file, not a directory" in proc.stdout


def test_an_unwritable_store_is_a_problem(tmp_path, monkeypatch):
    def refuse(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(doctor.tempfile, "mkstemp", refuse)  # as root every directory is writable
    (check,) = [c for c in doctor.check_store(str(tmp_path)) if c.label == "writable"]
    assert check.problem and check.value == f"no: Permission denied ({tmp_path})"
    assert check.fix == f"make {tmp_path} writable for this user, or pass --store DIR"


def test_missing_model_is_a_problem_with_a_fix(tmp_path):
    checks, path = doctor.check_model(str(tmp_path / "nope.gguf"))
    assert path is None and checks[0].problem and "does not exist" in checks[0].value
    assert "--model" in checks[0].fix
    assert doctor.self_test(None, "off")[0].problem


def test_a_crashing_self_test_is_reported_not_suffered(model_path):
    def crashing(model, extra_bufts):
        return run_probe(model, command=[sys.executable, "-c", f"import os; os.kill(os.getpid(), {int(signal.SIGSEGV)})"])

    (check,) = doctor.self_test(model_path, "on", runner=crashing)
    assert check.problem and check.value == "FAILED: llama.cpp crashed with SIGSEGV"
    assert "--extra-bufts off" in check.fix  # extra buffer types were on: say how to turn them off
    rendered = doctor.render([check])
    assert "PROBLEM FAILED" in rendered and rendered.rstrip().endswith("1 problem found")


def test_bad_setting_is_one_clear_line(tmp_path):
    proc = run_cli("doctor", "--store", str(tmp_path), env={"STEER_EXTRA_BUFTS": "sometimes"})
    assert proc.returncode == 2
    assert proc.stderr.strip() == "steer-tui: $STEER_EXTRA_BUFTS: 'sometimes' is not one of auto, on, off"
    cfg = tmp_path / "config.toml"
    cfg.write_text('extra_bufts = "fast"\n')
    proc = run_cli("doctor", "--store", str(tmp_path), env={"STEER_CONFIG": str(cfg)})
    assert proc.returncode == 2 and f"config file {str(cfg)!r}: extra_bufts: must be one of" in proc.stderr


def test_doctor_asks_about_torch_without_importing_it():
    """steer_tui never imports torch: the training section asks a child interpreter."""
    import subprocess

    code = ("import sys; from steer_tui.core import doctor; cs = doctor.check_train(); "
            "assert 'torch' not in sys.modules, 'torch imported'; print([c.label for c in cs])")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    assert "'cuda'" in proc.stdout  # the dev install has the train extra
