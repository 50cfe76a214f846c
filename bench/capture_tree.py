"""Capture one long, steer-dense task on the bundled model, for the packing benchmark.

A scripted annotator drives the Session API the way a person steers: let the model write
a stretch (--every tokens), roll back a few tokens (--cut), type a short correction (10-20
tokens, from a list of plain continuations), let it continue; when the model ends its turn
early, keep going (the end is cut like any other continuation). The result is an ordinary
steer tree with >= 50 steers over >= 1,000 generated tokens:

    python bench/capture_tree.py --out bench/out/tree.json
    python bench/packing.py --tree bench/out/tree.json
"""

from __future__ import annotations

import argparse
import random
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from steer_tui.core.engine import open_engine  # noqa: E402
from steer_tui.core.session import Session  # noqa: E402
from steer_tui.core.store import Store  # noqa: E402

HERE = Path(__file__).resolve().parent
PROMPT = "Write a long, detailed essay about the history of sailing ships and the people who sailed them."
CORRECTIONS = [
    " In practice, the crews learned this slowly, one voyage at a time.",
    " The records from that period are incomplete, so historians disagree.",
    " A typical merchant ship of the time carried about twenty sailors.",
    " This changed when better maps and instruments became common.",
    " Most of these ships were built from oak, which was strong but heavy.",
    " Sailors often spent months at sea with very little fresh food.",
    " Trade routes grew longer as ships became faster and safer.",
    " Ports along the coast grew into busy towns because of this trade.",
]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(HERE / "out" / "tree.json"))
    ap.add_argument("--steers", type=int, default=55)
    ap.add_argument("--every", type=int, default=24, help="model tokens between steers")
    ap.add_argument("--cut", type=int, default=6, help="tokens rolled back at each steer")
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args()

    rng = random.Random(args.seed)
    engine = open_engine(None, n_ctx=4096)
    tmp = tempfile.mkdtemp(prefix="steer-capture-")
    try:
        with Session.create(store=Store(tmp), prompt=PROMPT, model=engine, sampling={"temperature": 0.7, "seed": args.seed}, title="capture", annotator="script") as s:
            for _ in range(args.steers):
                list(s.generate(max_tokens=args.every))
                n = len(s.response_tokens)
                s.rollback(max(0, n - rng.randint(2, args.cut)))
                s.correct(rng.choice(CORRECTIONS))
            list(s.generate(max_tokens=args.every))
            path = s.store.task_path(s.task_id)
            tree = s.tree
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    generated = sum(len(n.tokens) for n in tree.nodes if n.is_model)
    human = sum(len(n.tokens) for n in tree.nodes if n.is_human)
    print(f"{out}: {len(tree.steers())} steers, {generated} model tokens + {human} human tokens in the tree, {len(tree.nodes)} nodes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
