"""``steer-tui auto``: the command-line side of rule-driven steering. Loads the rules and the
task queue, opens the model once, runs ``steer_tui.core.auto_run.run_auto`` and prints the
report (problems to stderr, a summary line and a JSON summary to stdout)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from steer_tui.core.auto import load_rules
from steer_tui.core.auto_run import run_auto
from steer_tui.core.engine import open_engine
from steer_tui.core.store import Store
from steer_tui.core.tasks import load_task_queue

__all__ = ["run_auto_cli"]


def run_auto_cli(ns: argparse.Namespace) -> int:
    """Run ``steer-tui auto`` for parsed arguments; returns the exit code (0)."""
    rules = load_rules(ns.rules)
    tasks, errors = load_task_queue(ns.tasks)
    for e in errors:
        print(f"steer-tui: skipped {e}", file=sys.stderr)
    kwargs: dict[str, Any] = {"adapter": ns.adapter, "n_ctx": ns.n_ctx, "extra_bufts": ns.extra_bufts}
    engine = open_engine(ns.model, **kwargs)
    sampling: dict[str, Any] = {"seed": ns.seed if ns.seed is not None else 0}
    if ns.temperature is not None:
        sampling["temperature"] = ns.temperature
    store = Store(ns.store) if ns.store else Store()
    try:
        report = run_auto(
            rules=rules,
            tasks=tasks,
            store=store,
            engine=engine,
            samples=ns.samples,
            max_tokens=ns.max_tokens,
            sampling=sampling,
            dry_run=ns.dry_run,
        )
    finally:
        engine.close()
    summary = report.summary()
    for msg in report.skipped:
        print(f"steer-tui: skipped task {msg}", file=sys.stderr)
    for s in report.samples:
        for m in s.messages:
            print(f"steer-tui: {s.task}: {m}", file=sys.stderr)
    if ns.dry_run:
        print(f"steer rate: {summary['steers_per_1k_tokens']} steers per 1,000 tokens "
              f"({summary['steers']} steers over {summary['model_tokens']} generated tokens, {summary['samples']} samples)")
    else:
        print(f"wrote {summary['samples']} tasks with {summary['steers']} steers to {store.tasks_dir}")
    print(json.dumps(summary))
    return 0
