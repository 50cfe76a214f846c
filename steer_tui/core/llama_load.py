"""The one place that constructs ``llama_cpp.Llama``: decides, per machine, whether llama.cpp's
*extra buffer types* are safe to use, and loads the model accordingly.

Why: llama.cpp built natively uses every instruction set the CPU reports. Its AMX buffer
type (an "extra" buffer type, like the weight-repacking one) crashes the whole process with
SIGSEGV/SIGILL on some Xeons that report AMX (Sapphire Rapids and newer, most cloud CPUs):
the tile configuration is requested on the main thread only. Python cannot catch that. The
same wheel runs fine with ``llama_model_params.use_extra_bufts = False``.

The decision (``extra_bufts`` setting, see :func:`resolve_setting`):

* ``"on"`` / ``"off"`` force it (``--extra-bufts``, ``$STEER_EXTRA_BUFTS`` or ``extra_bufts``
  in the config file);
* ``"auto"`` (the default) runs a **probe once per CPU and llama.cpp build**: a child process
  loads the bundled model with extra buffer types on and evaluates a prompt batch and a few
  single tokens from a worker thread, as the app does. If the child dies (a signal) or fails,
  extra buffer types stay off; if it streams, they are used. The verdict is cached in
  ``$STEER_CACHE/llama-probe.json`` (default: the platform cache dir), keyed by the CPU's
  model name and flags and by the llama.cpp build (version, system info, library files), so
  a new CPU, a rebuilt wheel or an upstream fix is probed again. The probe costs about a
  second, once.

A probe is chosen over "off whenever the CPU reports AMX" because it keeps the AMX and
repacking speed-ups wherever they work, adapts by itself when llama.cpp fixes the crash, and
also catches crashes on CPUs nobody has listed. docs/reliability.md has the figures.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

SETTINGS = ("auto", "on", "off")
ENV_SETTING = "STEER_EXTRA_BUFTS"
PROBE_FILE = "llama-probe.json"
PROBE_TIMEOUT_S = 120.0
PROBE_PROMPT = "The quick brown fox jumps over the lazy dog, then it runs into the forest and sleeps."
PROBE_OK = "steer-probe-ok"


class ProbeError(Exception):
    """A bad ``extra_bufts`` setting; the message names where it came from."""


@dataclass(frozen=True)
class Decision:
    """Whether llama.cpp may use extra buffer types here, and why (shown by ``doctor``)."""

    extra_bufts: bool
    setting: str
    """What asked for it: ``"on"``, ``"off"`` or ``"auto"``."""
    reason: str
    cached: bool = False


# ---------------------------------------------------------------------------- setting


def resolve_setting(flag: str | None = None, config: str | None = None) -> str:
    """The effective setting: the command-line flag, else ``$STEER_EXTRA_BUFTS``, else the
    config file's ``extra_bufts``, else ``"auto"``."""
    for value, where in ((flag, "--extra-bufts"), (os.environ.get(ENV_SETTING), f"${ENV_SETTING}"), (config, "config extra_bufts")):
        if value is None or value == "":
            continue
        v = str(value).strip().lower()
        if v not in SETTINGS:
            raise ProbeError(f"{where}: {value!r} is not one of {', '.join(SETTINGS)}")
        return v
    return "auto"


# ---------------------------------------------------------------------------- identity


def cpu_identity() -> dict[str, str]:
    """CPU model name and the feature flags the kernel reports (Linux ``/proc/cpuinfo``;
    elsewhere what ``platform`` knows)."""
    found: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                key = key.strip()
                if key in ("model name", "flags", "Features", "CPU part") and key not in found:
                    found[key] = value.strip()
                if "model name" in found and ("flags" in found or "Features" in found):
                    break
    except OSError:
        pass
    flags = found.get("flags") or found.get("Features") or ""
    return {
        "model": found.get("model name") or found.get("CPU part") or platform.processor() or platform.machine(),
        "machine": platform.machine(),
        "flags": " ".join(sorted(flags.split())),
    }


def cpu_has_amx(ident: dict[str, str] | None = None) -> bool:
    flags = (ident or cpu_identity())["flags"].split()
    return any(f.startswith("amx") for f in flags)


def llama_build_identity() -> dict[str, str]:
    """llama-cpp-python version, llama.cpp's system info line and the size/mtime of its
    shared libraries: a rebuilt wheel is a different build."""
    import llama_cpp

    libdir = Path(llama_cpp.__file__).parent / "lib"
    libs = []
    if libdir.is_dir():
        for f in sorted(libdir.iterdir()):
            if f.is_file():
                st = f.stat()
                libs.append(f"{f.name}:{st.st_size}:{int(st.st_mtime)}")
    info = llama_cpp.llama_print_system_info()
    return {
        "llama_cpp_python": getattr(llama_cpp, "__version__", "?"),
        "system_info": info.decode("utf-8", "replace").strip() if isinstance(info, bytes) else str(info),
        "libs": ";".join(libs),
    }


def probe_key(cpu: dict[str, str], build: dict[str, str], model: str | os.PathLike[str]) -> str:
    p = Path(model)
    try:
        st = p.stat()
        model_id = f"{p.name}:{st.st_size}"
    except OSError:
        model_id = p.name
    blob = json.dumps({"cpu": cpu, "build": build, "model": model_id}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def probe_cache_path() -> Path:
    env = os.environ.get("STEER_CACHE")
    if env:
        return Path(env).expanduser() / PROBE_FILE
    import platformdirs

    return Path(platformdirs.user_cache_dir("steer-tui")) / PROBE_FILE


def _read_cache(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_cache(path: Path, key: str, entry: dict[str, Any]) -> None:
    """Best effort: an unwritable cache only means probing again next time."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = _read_cache(path)
        data[key] = entry
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True), encoding="utf-8")
        os.replace(tmp, path)
    except OSError:
        pass


# ---------------------------------------------------------------------------- probe


@dataclass(frozen=True)
class ProbeResult:
    ok: bool
    detail: str
    seconds: float


def signal_name(sig: int) -> str:
    """``SIGSEGV`` for 11; a number the platform does not name stays a number."""
    try:
        return signal.Signals(sig).name
    except ValueError:
        return f"signal {sig}"


def probe_command(model: str | os.PathLike[str], extra_bufts: bool = True) -> list[str]:
    return [sys.executable, "-m", "steer_tui.core.llama_load", "--probe", str(model), "--extra-bufts", "on" if extra_bufts else "off"]


def run_probe(
    model: str | os.PathLike[str],
    *,
    extra_bufts: bool = True,
    command: Sequence[str] | None = None,
    timeout: float = PROBE_TIMEOUT_S,
) -> ProbeResult:
    """Load ``model`` in a child process and stream a few tokens; report how the child
    ended (a crash by signal is a result, not our crash). ``command`` replaces the child
    (tests use it to simulate a crashing llama.cpp)."""
    cmd = list(command) if command is not None else probe_command(model, extra_bufts)
    t0 = time.monotonic()
    env = dict(os.environ, PYTHONFAULTHANDLER="")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return ProbeResult(False, f"timed out after {timeout:.0f} s", time.monotonic() - t0)
    except OSError as exc:
        return ProbeResult(False, f"could not start: {exc}", time.monotonic() - t0)
    dt = time.monotonic() - t0
    if proc.returncode < 0:
        return ProbeResult(False, f"llama.cpp crashed with {signal_name(-proc.returncode)}", dt)
    if proc.returncode != 0 or PROBE_OK not in proc.stdout:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return ProbeResult(False, f"exit code {proc.returncode}: {tail[:200]}", dt)
    return ProbeResult(True, proc.stdout.strip().splitlines()[-1], dt)


def _probe_child(model: str, extra_bufts: bool) -> int:
    """The child's side: load, evaluate a batch and a few single tokens from a thread."""
    llm = load_llama(model, extra_bufts=extra_bufts, n_ctx=256, logits_all=False, verbose=False)
    tokens = llm.tokenize(PROBE_PROMPT.encode(), add_bos=True)
    out: list[str] = []

    def work() -> None:
        llm.eval(tokens)  # a prompt batch: the matrix-matrix kernels
        for _ in range(4):  # single tokens: the matrix-vector kernels
            llm.eval([int(llm.scores[llm.n_tokens - 1].argmax())])
        out.append("done")

    t0 = time.monotonic()
    th = threading.Thread(target=work)
    th.start()
    th.join()
    if out != ["done"]:
        return 1
    print(f"{PROBE_OK} {len(tokens) + 4} tokens in {time.monotonic() - t0:.2f} s")
    return 0


# ---------------------------------------------------------------------------- decision


def probe_model() -> Path | None:
    """The model the probe loads: the bundled one (small, always the same file)."""
    from steer_tui.core.models import ModelNotFound, default_model_path

    try:
        return default_model_path()
    except ModelNotFound:
        return None


def decide(
    setting: str = "auto",
    *,
    model: str | os.PathLike[str] | None = None,
    probe: Callable[[Path], ProbeResult] | None = None,
    refresh: bool = False,
) -> Decision:
    """Decide whether to use extra buffer types. ``model`` is probed only when the bundled
    model is missing. ``probe`` replaces :func:`run_probe` (tests); ``refresh`` ignores the
    cache."""
    if setting not in SETTINGS:
        raise ProbeError(f"extra_bufts: {setting!r} is not one of {', '.join(SETTINGS)}")
    if setting == "on":
        return Decision(True, "on", "forced on by the extra_bufts setting")
    if setting == "off":
        return Decision(False, "off", "forced off by the extra_bufts setting")
    target = probe_model() or (Path(model) if model is not None else None)
    if target is None:
        return Decision(False, "auto", "no model to probe with; extra buffer types off to be safe")
    cpu, build = cpu_identity(), llama_build_identity()
    key = probe_key(cpu, build, target)
    cache = probe_cache_path()
    if not refresh:
        hit = _read_cache(cache).get(key)
        if isinstance(hit, dict) and isinstance(hit.get("extra_bufts"), bool):
            return Decision(hit["extra_bufts"], "auto", str(hit.get("reason", "")), cached=True)
    result = (probe or run_probe)(target)
    if result.ok:
        reason = f"probe streamed with extra buffer types on ({result.seconds:.1f} s)"
    else:
        reason = f"probe with extra buffer types on failed: {result.detail}; using them off"
    decision = Decision(result.ok, "auto", reason)
    if result.ok or "crashed" in result.detail:  # a timeout or a load error may be passing
        _write_cache(cache, key, {**asdict(decision), "cpu": cpu["model"], "amx": cpu_has_amx(cpu),
                                  "llama_cpp_python": build["llama_cpp_python"], "at": time.strftime("%Y-%m-%dT%H:%M:%S")})
    return decision


_decided: dict[tuple[str, str | None], Decision] = {}
_decide_lock = threading.Lock()


def decide_cached(setting: str = "auto", model: str | os.PathLike[str] | None = None) -> Decision:
    """:func:`decide`, remembered for the life of the process."""
    k = (setting, None if model is None else str(model))
    with _decide_lock:
        if k not in _decided:
            _decided[k] = decide(setting, model=model)
        return _decided[k]


# ---------------------------------------------------------------------------- loading

_params_lock = threading.Lock()


@contextmanager
def _model_params(extra_bufts: bool) -> Iterator[None]:
    """``Llama.__init__`` builds its ``llama_model_params`` from
    ``llama_cpp.llama_model_default_params()`` and exposes no switch for ``use_extra_bufts``;
    hand it defaults with our value for the length of one constructor call."""
    import llama_cpp.llama_cpp as lc

    original = lc.llama_model_default_params

    def params() -> Any:
        p = original()
        p.use_extra_bufts = extra_bufts
        return p

    with _params_lock:
        lc.llama_model_default_params = params
        try:
            yield
        finally:
            lc.llama_model_default_params = original


def load_llama(
    model_path: str | os.PathLike[str],
    *,
    extra_bufts: bool | str | None = None,
    **kwargs: Any,
):
    """``llama_cpp.Llama(model_path, **kwargs)`` with the extra-buffer-type decision applied.

    ``extra_bufts``: True/False forces it; a setting string (``"auto"``, ``"on"``,
    ``"off"``) or None (= the environment's setting) is decided by :func:`decide_cached`.
    A vocab-only load computes nothing and skips the decision."""
    import llama_cpp

    if kwargs.get("vocab_only"):
        use = False
    elif isinstance(extra_bufts, bool):
        use = extra_bufts
    else:
        use = decide_cached(resolve_setting(extra_bufts), model_path).extra_bufts
    with _model_params(use):
        llm = llama_cpp.Llama(model_path=str(model_path), **kwargs)
    if bool(llm.model_params.use_extra_bufts) != use:  # a llama-cpp-python that builds params differently
        llm.close()
        raise RuntimeError("llama-cpp-python ignored use_extra_bufts; steer cannot guard this CPU")
    return llm


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) == 4 and args[0] == "--probe" and args[2] == "--extra-bufts":
        return _probe_child(args[1], args[3] == "on")
    print("usage: python -m steer_tui.core.llama_load --probe MODEL.gguf --extra-bufts on|off", file=sys.stderr)
    return 2


if __name__ == "__main__":  # pragma: no cover - the probe child
    sys.exit(main())
