"""Run the app in a child process so that a crash Python cannot catch leaves a sane terminal.

llama.cpp runs inside the app's process. If it dies of a signal (SIGSEGV or SIGILL from a
CPU kernel, SIGKILL from the OOM killer), no Python code runs: Textual never leaves the
alternate screen, the terminal stays in raw mode with mouse reporting on, and the user sees
a frozen screen over SSH. ``steer-tui session`` therefore starts the app as a child and
waits. When the child dies of a signal, the parent restores the terminal modes it saved
before the start, leaves the alternate screen, shows the cursor, and prints what happened
and what to do. The task is already on disk: the session saves after every action and
checkpoints a long generation every 10 s.

The child's fatal-error traceback (``faulthandler``) goes to a log file in the cache dir
instead of the hidden alternate screen; the message names it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Sequence

from steer_tui.core.llama_load import signal_name

CHILD_ENV = "STEER_SUPERVISED"
"""Set in the child's environment: the child runs the app itself."""

CRASH_SIGNALS = {signal.SIGSEGV, signal.SIGILL, signal.SIGBUS, signal.SIGFPE, signal.SIGABRT}
QUIET_SIGNALS = {signal.SIGTERM, signal.SIGHUP, signal.SIGINT}
"""Signals a user or the system sends on purpose: restore the terminal, say nothing."""

# mouse/focus/paste reporting off, pop the kitty keyboard mode, default colours, leave the
# alternate screen, line wrapping back on, show the cursor
TERMINAL_RESET = (
    "\x1b[?1000l\x1b[?1002l\x1b[?1003l\x1b[?1006l\x1b[?1015l\x1b[?1004l\x1b[?2004l"
    "\x1b[<u\x1b[0m\x1b[?1049l\x1b[?7h\x1b[?25h\r\n"
)


def is_child() -> bool:
    return os.environ.get(CHILD_ENV) == "1"


def crash_log_path() -> Path:
    env = os.environ.get("STEER_CACHE")
    if env:
        return Path(env).expanduser() / "crash.log"
    import platformdirs

    return Path(platformdirs.user_cache_dir("steer-tui")) / "crash.log"


def enable_crash_log() -> None:
    """In the child: send a fatal error's Python traceback to the crash log."""
    import faulthandler

    path = crash_log_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(path, "w", encoding="utf-8")  # kept open for the life of the process
    except OSError:
        return
    faulthandler.enable(file=fh, all_threads=True)


def _save_tty(fd: int):
    try:
        import termios

        return termios.tcgetattr(fd)
    except (ImportError, OSError, ValueError):
        return None


def _restore_tty(fd: int, attrs) -> None:
    if attrs is not None:
        try:
            import termios

            termios.tcsetattr(fd, termios.TCSAFLUSH, attrs)
        except (ImportError, OSError, ValueError):
            pass
    try:
        os.write(fd, TERMINAL_RESET.encode())
    except OSError:
        pass


def crash_message(sig: int, store: str | None) -> str:
    name = signal_name(sig)
    where = f"in {store}" if store else "in the store"
    saved = (
        f"Everything up to your last action is saved {where}; `steer-tui list` shows the task and "
        f"`steer-tui session --task ID` reopens it."
    )
    if sig == signal.SIGKILL:
        return f"steer-tui: the app was killed (SIGKILL; often the system running out of memory). {saved}"
    return (
        f"steer-tui: the app died: llama.cpp (or another native library) crashed with {name}. {saved}\n"
        f"steer-tui: `steer-tui doctor` checks this machine; `--extra-bufts off` avoids llama.cpp's AMX "
        f"crash on some Xeons. Traceback: {crash_log_path()}"
    )


def run_supervised(argv: Sequence[str], *, store: str | None = None) -> int:
    """Run ``steer-tui <argv>`` as a child with the terminal; return its exit code, or
    128 + the signal that killed it (after restoring the terminal and saying why)."""
    fd = sys.stdout.fileno() if sys.stdout.isatty() else None
    attrs = _save_tty(fd) if fd is not None else None
    env = dict(os.environ, **{CHILD_ENV: "1"})
    proc = subprocess.Popen([sys.executable, "-m", "steer_tui.cli", *argv], env=env)

    def forward(signum, _frame) -> None:
        if proc.poll() is None:
            proc.send_signal(signum)

    old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGHUP)}
    # ctrl+c reaches the app as a key in raw mode; a SIGINT from outside goes to the whole
    # foreground group, so the child gets it too: the parent only waits
    old[signal.SIGINT] = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        rc = proc.wait()
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    if rc >= 0:
        return rc
    sig = -rc
    if fd is not None:
        _restore_tty(fd, attrs)
    if sig not in QUIET_SIGNALS:
        print(crash_message(sig, store), file=sys.stderr)
    return 128 + sig
