"""The SIGKILL harness shared by tests/reliability/test_crash.py and bench/faults.py.

``kill_chain`` runs fault_worker.py on one task again and again, kills each run with
SIGKILL after a random delay, and after every kill checks the task file:

- it loads and passes validation (``load_tree``);
- its bytes are exactly the last save that completed (an ``END`` line was read) or one that
  had begun after it (``BEGIN``): the previous or the new complete file, never a torn one;
- it holds every steer (id, replaced node, token ids) of the last completed save.

The next run opens the same task, so each kill also checks that a killed session's lock
does not block the next one, and that the position restored from the file is usable.
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
    kills_before_ready: int = 0
    orphan_tmp_files: int = 0
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
    """Collects the worker's stdout lines as they arrive (they survive the kill)."""

    def __init__(self, stream) -> None:
        super().__init__(daemon=True)
        self.stream = stream
        self.lines: list[str] = []
        self.ready = threading.Event()

    def run(self) -> None:
        for raw in self.stream:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            self.lines.append(line)
            if line == "READY":
                self.ready.set()


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
    for k in range(kills):
        env["STEER_FAULT_SLOWFS"] = "1" if slowfs_every and k % slowfs_every == 1 else "0"
        proc = subprocess.Popen(
            [sys.executable, str(WORKER), mode, str(store), task_id, str(rng.randrange(2**31))],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            cwd=str(REPO),
        )
        reader = _Reader(proc.stdout)
        reader.start()
        if rng.random() < 0.1:
            # kill during start-up: imports, model load, Session.open/create, first save
            time.sleep(rng.random() * (0.3 if mode == "fake" else 1.0))
        else:
            deadline = time.monotonic() + ready_timeout
            while not reader.ready.wait(0.05) and proc.poll() is None:
                if time.monotonic() > deadline:
                    proc.kill()
                    rep.problems.append(f"kill {k}: worker not ready in {ready_timeout}s")
                    break
            time.sleep(rng.random() * max_delay)
        died_early = proc.poll() is not None
        if not died_early:
            proc.send_signal(signal.SIGKILL)
        proc.wait()
        reader.join(5)
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

        # check the file
        rep.orphan_tmp_files = len(list(path.parent.glob(f".{path.name}.*.tmp"))) if path.parent.exists() else 0
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
        rep.steers_checked += len(last_snapshot["steers"])
        for sid, (replaces, crc) in last_snapshot["steers"].items():
            n = by_id.get(sid)
            # a later rollback inside the correction splits it (tree.split): its tokens then
            # continue in a tail node (split_from), which original_tokens() follows
            if n is None or n.replaces != replaces or _crc(tree.original_tokens(sid)) != crc:
                rep.lost_steers += 1
                rep.problems.append(f"kill {k}: steer {sid} of a completed save is missing or changed")
        if len(tree.nodes) < last_snapshot["nodes"]:
            rep.lost_steers += 0  # nodes are never deleted: count it as corruption
            rep.corrupt += 1
            rep.problems.append(f"kill {k}: {len(tree.nodes)} nodes < {last_snapshot['nodes']} saved before")
    rep.seconds = round(time.monotonic() - t0, 1)
    return rep


def _crc(tokens: list[int]) -> int:
    import zlib

    return zlib.crc32(json.dumps(tokens).encode())
