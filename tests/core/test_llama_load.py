"""The extra-buffer-type decision (issue 11): settings, the probe's decision path under a
simulated crash, the cache, and that the loader really hands llama.cpp the decision.

A crashing llama.cpp is simulated by a probe child that kills itself with SIGILL or SIGSEGV
(what the AMX kernels do on the CPUs that crash), so the decision path runs the same on
every CPU; the real probe child runs too, with extra buffer types off, which must stream
everywhere."""

from __future__ import annotations

import json
import signal
import sys

import pytest

from steer_tui.core import llama_load
from steer_tui.core.llama_load import Decision, ProbeError, ProbeResult, decide, load_llama, resolve_setting, run_probe


def _suicide(sig: int) -> list[str]:
    return [sys.executable, "-c", f"import os; os.kill(os.getpid(), {int(sig)})"]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("STEER_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / llama_load.PROBE_FILE


def test_setting_precedence_and_errors(monkeypatch):
    monkeypatch.delenv(llama_load.ENV_SETTING, raising=False)
    assert resolve_setting() == "auto"
    assert resolve_setting(None, "off") == "off"
    monkeypatch.setenv(llama_load.ENV_SETTING, "ON")
    assert resolve_setting(None, "off") == "on"  # env beats the config file
    assert resolve_setting("off", "auto") == "off"  # the flag beats both
    monkeypatch.setenv(llama_load.ENV_SETTING, "maybe")
    with pytest.raises(ProbeError, match=r"\$STEER_EXTRA_BUFTS: 'maybe' is not one of auto, on, off"):
        resolve_setting()
    monkeypatch.delenv(llama_load.ENV_SETTING)
    with pytest.raises(ProbeError, match="config extra_bufts"):
        resolve_setting(None, "sometimes")


@pytest.mark.parametrize("sig", [signal.SIGILL, signal.SIGSEGV], ids=["SIGILL", "SIGSEGV"])
def test_probe_reports_a_crash_by_signal(model_path, sig):
    r = run_probe(model_path, command=_suicide(sig))
    assert not r.ok
    assert r.detail == f"llama.cpp crashed with {signal.Signals(sig).name}"


def test_simulated_crash_turns_extra_bufts_off_and_is_cached(cache, model_path):
    calls = []

    def crashing(model):
        calls.append(model)
        return run_probe(model, command=_suicide(signal.SIGILL))

    d = decide("auto", probe=crashing)
    assert d == Decision(False, "auto", d.reason, cached=False)
    assert "crashed with SIGILL" in d.reason and len(calls) == 1
    assert calls[0] == model_path  # the bundled model is what gets probed
    entry = next(iter(json.loads(cache.read_text()).values()))
    assert entry["extra_bufts"] is False and "SIGILL" in entry["reason"]

    def must_not_run(model):
        raise AssertionError("the cached verdict should have been used")

    again = decide("auto", probe=must_not_run)
    assert again.extra_bufts is False and again.cached
    # a refresh probes again
    fresh = decide("auto", probe=lambda m: ProbeResult(True, "ok", 0.1), refresh=True)
    assert fresh.extra_bufts is True and not fresh.cached


def test_a_new_build_or_cpu_is_probed_again(cache, monkeypatch):
    decide("auto", probe=lambda m: ProbeResult(False, "llama.cpp crashed with SIGSEGV", 0.1))
    seen = []
    real = llama_load.llama_build_identity

    def rebuilt():
        return {**real(), "libs": "libggml-cpu.so:1:2"}

    monkeypatch.setattr(llama_load, "llama_build_identity", rebuilt)
    d = decide("auto", probe=lambda m: seen.append(m) or ProbeResult(True, "ok", 0.1))
    assert seen and d.extra_bufts is True
    monkeypatch.setattr(llama_load, "cpu_identity", lambda: {"model": "Other CPU", "machine": "x86_64", "flags": "avx2"})
    seen.clear()
    decide("auto", probe=lambda m: seen.append(m) or ProbeResult(True, "ok", 0.1))
    assert seen, "another CPU must be probed"
    assert len(json.loads(cache.read_text())) == 3


def test_passing_failures_are_not_cached(cache):
    d = decide("auto", probe=lambda m: ProbeResult(False, "timed out after 120 s", 120.0))
    assert d.extra_bufts is False  # safe for this run
    assert not cache.exists(), "a timeout may be a loaded machine: probe again next time"


def test_forced_settings_never_probe(cache):
    def must_not_run(model):
        raise AssertionError("forced settings do not probe")

    assert decide("on", probe=must_not_run).extra_bufts is True
    assert decide("off", probe=must_not_run).extra_bufts is False
    with pytest.raises(ProbeError):
        decide("sometimes")


def test_real_probe_child_streams_with_extra_bufts_off(model_path):
    r = run_probe(model_path, extra_bufts=False)
    assert r.ok, r.detail
    assert r.detail.startswith(llama_load.PROBE_OK)


def test_loader_hands_llama_cpp_the_decision(model_path):
    llm = load_llama(model_path, extra_bufts=False, n_ctx=64, verbose=False)
    try:
        assert llm.model_params.use_extra_bufts is False
    finally:
        llm.close()
    vocab = load_llama(model_path, extra_bufts=True, vocab_only=True, verbose=False)
    assert vocab.model_params.use_extra_bufts is False  # nothing computed, nothing to decide
    vocab.close()
    import llama_cpp.llama_cpp as lc

    assert lc.llama_model_default_params().use_extra_bufts is True  # the patch is scoped


def test_open_engine_passes_the_setting(model_path, monkeypatch):
    from steer_tui.core.engine import open_engine

    monkeypatch.setattr(llama_load, "_decided", {})
    eng = open_engine(model_path, n_ctx=64, extra_bufts="off")
    try:
        assert eng.llm.model_params.use_extra_bufts is False
        assert eng.top(eng.tokenize("Hello", add_bos=True), 1)
    finally:
        eng.close()
