"""The SIGKILL harness shared by tests/reliability/test_crash.py and bench/faults.py.

``kill_chain`` runs fault_worker.py on one task again and again, kills each run with
SIGKILL after a random delay, and after every kill checks the task file:

- it loads and passes validation (``load_tree``);
- its bytes are exactly the last save that completed (an ``END`` line was read) or one that
  had begun after it (``BEGIN``): the previous or the new complete file, never a torn one;
- it holds every steer (id, replaced node, token ids) of the last completed save, unchanged
  (a saved steer never changes), and of the later save it holds, if any.

The next run opens the same task, so each kill also checks that a killed session's lock
does not block the next one, and that the position restored from the file is usable.

The harness counts its own coverage, so a test can insist that it checked something:
``kills_mid_save`` (the worker had begun a save and not finished it), ``orphan_tmp_files``
(temp files a kill left behind; only a kill inside a save may leave one, and the next
session that takes the lock must remove it: ``stale_orphans`` counts those it did not).
The kill moments adapt to the machine: every fourth kill lands inside a save (the parent
kills as soon as the worker reports one has begun, plus a random part of the save durations
measured so far; that worker's fsyncs are slowed to 0-40 ms so the save outlasts the
parent's reaction even on a loaded machine), start-up kills are spread over the start-up time measured so far, and
the others come a random time after the worker is ready. A slow machine shifts the moments,
not what they hit.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

WORKER = Path(__file__).with_name("fault_worker.py")
REPO = Path(__file__).resolve().parents[2]


@dataclass
class FaultReport:
    mode: str
    kills: int = 0
    files_checked: int = 0
    corrupt: int = 0
    lost_steers: int = 0
    steers_checked: int = 0  # sum over kills of the steers the last completed save held
    saves_completed: int = 0
    kills_mid_save: int = 0  # the last line read was BEGIN: the kill landed inside a save (or just after)
    kills_aimed_at_saves: int = 0  # kills sent as soon as a save had begun
    kills_before_ready: int = 0
    orphan_tmp_files: int = 0  # temp files left by a killed worker (summed over kills)
    stale_orphans: int = 0  # temp files of an earlier worker still there after the next one took the lock
    lost_nodes: int = 0  # nodes of the last completed save missing from the file
    worker_crashes: int = 0
    refusals: int = 0
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["problems"] = self.problems[:20]
        return d

    def add(self, other: FaultReport) -> None:
        for k, v in asdict(other).items():
            if isinstance(v, (int, float)) and k != "mode":
                setattr(self, k, getattr(self, k) + v)
        self.problems.extend(other.problems)


class _Reader(threading.Thread):
    """Collects the worker's stdout lines as they arrive (they survive the kill), with the
    time each arrived. With ``kill_on_begin`` set (seconds) it SIGKILLs the worker that long
    after the first ``BEGIN`` line that follows ``READY``: a kill inside a save."""

    def __init__(self, proc: subprocess.Popen, kill_on_begin: float | None = None) -> None:
        super().__init__(daemon=True)
        self.proc = proc
        self.stream = proc.stdout
        self.kill_on_begin = kill_on_begin
        self.lines: list[str] = []
        self.stamps: list[float] = []
        self.ready = threading.Event()
        self.killed = threading.Event()

    def run(self) -> None:
        for raw in self.stream:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            self.stamps.append(time.monotonic())  # (before the line: an index into lines is one into stamps)
            self.lines.append(line)
            if line == "READY":
                self.ready.set()
            elif self.kill_on_begin is not None and self.ready.is_set() and not self.killed.is_set() and line.startswith("BEGIN "):
                if self.kill_on_begin > 0:
                    time.sleep(self.kill_on_begin)
                self.proc.send_signal(signal.SIGKILL)
                self.killed.set()

    def save_durations(self) -> list[float]:
        """Seconds from each BEGIN to its END, for the saves that completed."""
        out, begun = [], None
        for line, t in zip(self.lines, self.stamps):
            if line.startswith("BEGIN "):
                begun = t
            elif line.startswith("END ") and begun is not None:
                out.append(t - begun)
                begun = None
        return out


def _orphan_pid(tmp: Path) -> int | None:
    """The writer's pid in a temp file name ``.<id>.json.<pid>.<hex>.tmp``."""
    try:
        return int(tmp.name.rsplit(".", 3)[1])
    except (IndexError, ValueError):
        return None


def kill_chain(
    mode: str,
    store: Path,
    task_id: str,
    kills: int,
    *,
    seed: int = 0,
    max_delay: float = 0.6,
    ready_timeout: float = 120.0,
    slowfs_every: int = 2,
    extra_env: dict[str, str] | None = None,
) -> FaultReport:
    """Run ``kills`` worker runs on ``store``/``task_id``, each SIGKILLed at a random moment."""
    from steer_tui.core.store import StoreError, load_tree
    from steer_tui.core.tree import TreeError

    rng = random.Random(seed)
    rep = FaultReport(mode=mode)
    t0 = time.monotonic()
    path = Path(store) / "tasks" / f"{task_id}.json"
    last_end: str | None = None  # sha of the last save known complete
    begun: dict[str, dict] = {}  # sha -> snapshot, for saves begun (this chain)
    after_end: set[str] = set()  # shas begun since the last END
    last_snapshot: dict = {"steers": {}, "nodes": 0}
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("PYTHONHASHSEED", "0")
    env.update(extra_env or {})
    startup_seconds: list[float] = []  # worker start to READY, measured on this machine
    save_seconds: list[float] = []  # BEGIN to END of completed saves, measured on this machine
    for k in range(kills):
        env["STEER_FAULT_SLOWFS"] = "1" if slowfs_every and k % slowfs_every == 1 else "0"
        kind = "save" if k % 4 == 2 else "startup" if rng.random() < 0.1 else "random"
        kill_on_begin = None
        if kind == "save":  # as soon as a save has begun, plus up to half a typical save
            typical = sorted(save_seconds)[len(save_seconds) // 2] if save_seconds else 0.0
            kill_on_begin = rng.random() * 0.5 * typical
            env["STEER_FAULT_SLOWFS"] = "40"
            rep.kills_aimed_at_saves += 1
        t_start = time.monotonic()
        proc = subprocess.Popen(
            [sys.executable, str(WORKER), mode, str(store), task_id, str(rng.randrange(2**31))],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            cwd=str(REPO),
        )
        reader = _Reader(proc, kill_on_begin)
        reader.start()
        if kind == "startup":
            # kill during start-up: imports, model load, Session.open/create, first save;
            # spread over the start-up time this machine has shown (a guess until measured)
            typical = sum(startup_seconds) / len(startup_seconds) if startup_seconds else (0.3 if mode == "fake" else 1.0)
            time.sleep(rng.random() * typical)
        else:
            deadline = time.monotonic() + ready_timeout
            while not reader.ready.wait(0.05) and proc.poll() is None:
                if time.monotonic() > deadline:
                    proc.kill()
                    rep.problems.append(f"kill {k}: worker not ready in {ready_timeout}s")
                    break
            if reader.ready.is_set():
                startup_seconds.append(reader.stamps[reader.lines.index("READY")] - t_start)
            if kind == "save" and reader.ready.is_set():  # the reader kills it at its next save
                deadline = time.monotonic() + 30 + 3 * max_delay  # a live session saves after every action
                while not reader.killed.wait(0.05) and proc.poll() is None and time.monotonic() < deadline:
                    pass
                if not reader.killed.is_set() and proc.poll() is None:
                    rep.problems.append(f"kill {k}: the worker began no save within {30 + 3 * max_delay:.0f}s of READY")
            else:
                time.sleep(rng.random() * max_delay)
        died_early = proc.poll() is not None and not reader.killed.is_set()
        if not died_early:
            proc.send_signal(signal.SIGKILL)
        proc.wait()
        reader.join(5)
        save_seconds.extend(reader.save_durations())
        err = proc.stderr.read().decode("utf-8", "replace")
        proc.stdout.close()
        proc.stderr.close()
        if died_early:
            rep.worker_crashes += 1
            rep.problems.append(f"kill {k}: worker exited by itself (rc {proc.returncode}): {err[-2000:]}")
        rep.kills += 1
        if not reader.ready.is_set():
            rep.kills_before_ready += 1

        # replay what the worker reported
        last_line = ""
        for line in reader.lines:
            if line.startswith("BEGIN "):
                _, sha, snap = line.split(" ", 2)
                begun[sha] = json.loads(snap)
                after_end.add(sha)
                last_line = "BEGIN"
            elif line.startswith("END "):
                sha = line.split(" ", 1)[1]
                last_end = sha
                last_snapshot = begun[sha]
                after_end = set()
                rep.saves_completed += 1
                last_line = "END"
            elif line.startswith("REFUSED"):
                rep.refusals += 1
        if last_line == "BEGIN":
            rep.kills_mid_save += 1

        # temp files: only a kill inside a save may leave one (this worker's); a worker that
        # got as far as READY held the lock, whose taking removes every earlier worker's
        orphans = list(path.parent.glob(f".{path.name}.*.tmp")) if path.parent.exists() else []
        mine = [o for o in orphans if _orphan_pid(o) == proc.pid]
        rep.orphan_tmp_files += len(mine)
        if len(mine) > 1 or (mine and last_line != "BEGIN"):
            rep.problems.append(f"kill {k}: {len(mine)} temp file(s) left by a kill outside a save: {[o.name for o in mine]}")
        if reader.ready.is_set():
            stale = [o for o in orphans if _orphan_pid(o) != proc.pid]
            rep.stale_orphans += len(stale)
            if stale:
                rep.problems.append(f"kill {k}: temp files of earlier workers survived the lock: {[o.name for o in stale]}")

        # check the file
        if not path.exists():
            if last_end is not None:
                rep.corrupt += 1
                rep.problems.append(f"kill {k}: {path} is missing after a completed save")
            continue
        rep.files_checked += 1
        raw = path.read_bytes()
        sha = hashlib.sha256(raw).hexdigest()
        try:
            tree = load_tree(path)
        except (StoreError, TreeError) as exc:
            rep.corrupt += 1
            rep.problems.append(f"kill {k}: does not load: {exc}")
            continue
        if sha != last_end and sha not in after_end:
            rep.corrupt += 1
            rep.problems.append(f"kill {k}: file is neither the last completed save nor a later one (sha {sha[:12]})")
        by_id = {n.id: n for n in tree.nodes}
        # Once saved, a steer never changes: nodes are never deleted, a rollback inside one
        # splits it into a head and tail parts (split_from) that original_tokens() joins back,
        # and undo only marks it discarded. So every steer of the last completed save must be
        # in the file as it was, whichever save the file holds; and a later save whose rename
        # landed before the kill (its END never printed) must hold its own steers too.
        checks = [("the last completed save", last_snapshot)]
        if sha != last_end and sha in begun:
            checks.append(("the later save the file holds", begun[sha]))
        for which, snap in checks:
            rep.steers_checked += len(snap["steers"])
            for sid, (replaces, crc) in snap["steers"].items():
                n = by_id.get(sid)
                if n is None or n.replaces != replaces or _crc(tree.original_tokens(sid)) != crc:
                    rep.lost_steers += 1
                    what = ("missing" if n is None else f"replacing {n.replaces!r}, saved as replacing {replaces!r}"
                            if n.replaces != replaces else f"holding other tokens {tree.original_tokens(sid)[:12]}")
                    rep.problems.append(f"kill {k}: steer {sid} of {which} is {what} (file {path})")
        if len(tree.nodes) < last_snapshot["nodes"]:  # nodes are never deleted
            rep.lost_nodes += last_snapshot["nodes"] - len(tree.nodes)
            rep.corrupt += 1
            rep.problems.append(f"kill {k}: {len(tree.nodes)} nodes < {last_snapshot['nodes']} saved before")
    rep.seconds = round(time.monotonic() - t0, 1)
    return rep


def _crc(tokens: list[int]) -> int:
    import zlib

    return zlib.crc32(json.dumps(tokens).encode())
