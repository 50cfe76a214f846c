"""Crash-safety figures: SIGKILL scripted sessions at random moments and check every file.

    python bench/faults.py [--kills 200] [--seed 0] [--out bench/out/faults.json]

Splits the kills 70/20/10 between a headless Session on the FakeEngine, the Textual app
(headless pilot, FakeEngine) and a Session on the bundled SmolLM2 GGUF; prints one JSON line
per mode and the totals (kills, files checked, corrupt, lost steers) and writes them to
``--out``. The harness is tests/reliability/killer.py (the same one the tests use).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.reliability.killer import FaultReport, kill_chain  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kills", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--modes", default="fake,app,real")
    ap.add_argument("--out", default=str(REPO / "bench" / "out" / "faults.json"))
    a = ap.parse_args()
    share = {"fake": 0.7, "app": 0.2, "real": 0.1}
    modes = [m for m in a.modes.split(",") if m]
    total = FaultReport(mode="all")
    per = []
    for i, mode in enumerate(modes):
        n = max(1, round(a.kills * share[mode] / sum(share[m] for m in modes)))
        with tempfile.TemporaryDirectory(prefix=f"faults-{mode}-") as d:
            rep = kill_chain(mode, Path(d), f"fault-{mode}", n, seed=a.seed + i,
                             max_delay={"fake": 0.5, "app": 1.5, "real": 10.0}[mode])
        print(json.dumps(rep.to_dict()), flush=True)
        per.append(rep.to_dict())
        total.add(rep)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    summary = {"total": total.to_dict(), "modes": per, "command": " ".join(sys.argv)}
    out.write_text(json.dumps(summary, indent=2) + "\n")
    t = total
    print(f"kills {t.kills}, files checked {t.files_checked}, corrupt {t.corrupt}, lost steers {t.lost_steers}, "
          f"steers checked {t.steers_checked}, saves completed {t.saves_completed}, kills mid-save {t.kills_mid_save}, "
          f"worker crashes {t.worker_crashes} ({t.seconds:.0f} s) -> {out}")
    return 0 if t.corrupt == 0 and t.lost_steers == 0 and t.worker_crashes == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
