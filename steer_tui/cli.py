"""``steer-tui``: one command group. Every subcommand returns an exit code; user mistakes
print one clear line to stderr (exit 2) instead of a traceback."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Callable, Sequence

from steer_tui import __version__
from steer_tui.core.export import FORMATS
from steer_tui.core.llama_load import SETTINGS


class CliError(Exception):
    """A user-facing error: printed as ``steer-tui: <message>`` with exit code 2."""


# ---------------------------------------------------------------------------------------
# argument parsing


def _positive_int(name: str) -> Callable[[str], int]:
    def conv(s: str) -> int:
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer, got {s!r}") from None
        if v <= 0:
            raise argparse.ArgumentTypeError(f"{name} must be positive, got {v}")
        return v

    return conv


def _temperature(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--temperature must be a number, got {s!r}") from None
    if not 0 <= v <= 10:
        raise argparse.ArgumentTypeError(f"--temperature must be between 0 and 10, got {v}")
    return v


def _add_store(p: argparse.ArgumentParser) -> None:
    p.add_argument("--store", metavar="DIR", help="task store (default: $STEER_STORE or the platform data dir)")


def _add_model(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", metavar="GGUF", help="GGUF model file (default: bundled SmolLM2-135M-Instruct Q4_1)")
    p.add_argument("--adapter", metavar="LORA_GGUF", help="LoRA adapter in llama.cpp GGUF format (from steer-train)")
    p.add_argument("--n-ctx", type=_positive_int("--n-ctx"), default=4096, help="context size in tokens (default 4096)")
    p.add_argument(
        "--n-gpu-layers",
        type=int,
        default=-1,
        help="layers to offload to the GPU where llama.cpp was built with GPU support (default: all)",
    )
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default: random, recorded in the task)")
    p.add_argument("--temperature", type=_temperature, default=None, help="sampling temperature (0 = greedy)")
    _add_extra_bufts(p)


def _add_extra_bufts(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--extra-bufts",
        choices=SETTINGS,
        default=None,
        help="llama.cpp extra buffer types (AMX, weight repacking): auto = probe once per CPU and "
        "llama.cpp build and use them where they do not crash (default; also $STEER_EXTRA_BUFTS "
        "or extra_bufts in the config file)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="steer-tui",
        description="Steer a local LLM token by token; every correction is saved as training data.",
    )
    parser.add_argument("--version", action="version", version=f"steer-tui {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("session", help="the steering app (Textual)")
    _add_model(p)
    _add_store(p)
    p.add_argument("--task", metavar="ID", help="open this saved task")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", metavar="TEXT", help="start a new task with this prompt")
    src.add_argument("--tasks", metavar="FILE.jsonl", help="work through a queue of prompts (JSONL)")
    p.add_argument("--system", metavar="TEXT", help="system prompt for new chat tasks")
    p.add_argument("--raw", action="store_true", help="use --prompt as raw text, without the chat template")
    p.add_argument("--annotator", default=os.environ.get("STEER_ANNOTATOR") or os.environ.get("USER"), help="your name, recorded on each steer")
    p.add_argument("--read-only", action="store_true", help="open --task without editing it")
    p.add_argument("--max-tokens", type=_positive_int("--max-tokens"), default=None, help="tokens per continuation")

    p = sub.add_parser("list", help="list saved tasks")
    _add_store(p)

    p = sub.add_parser("show", help="print a task's tree as text, steers marked")
    _add_store(p)
    p.add_argument("task", metavar="TASK", help="task id, or a path to a task file")

    p = sub.add_parser("export", help="write training data as JSONL (dpo, sft, kto, trees)")
    _add_store(p)
    p.add_argument("--format", required=True, choices=FORMATS)
    p.add_argument("--out", required=True, metavar="FILE.jsonl")
    p.add_argument("--from", dest="sources", action="append", metavar="DIR|FILE", help="task files or dirs (default: the store; repeatable)")
    p.add_argument("--model", metavar="GGUF", help="vocabulary for rejected-span text (default: the model recorded in the trees)")
    p.add_argument("--rejected-tokens", type=_positive_int("--rejected-tokens"), default=None, help="K: rejected span length (default: the chosen length)")

    p = sub.add_parser(
        "auto",
        help="headless rule-driven steering (writes ordinary steer trees)",
        description="Steer headlessly with rules checked while tokens stream. Each [[rule]] in RULES.toml has "
        "name, pattern (a Python regex) and action: replace (type 'replace' instead), pick (the best top-k "
        "alternative that avoids the match), stop (end the answer there) or rewrite (roll back to the start of "
        "the 'scope', sentence or clause, and let the model write up to 'max_tokens' tokens, default 20, with "
        "the matched words' tokens banned). docs/auto.md has the details.",
    )
    _add_model(p)
    _add_store(p)
    p.add_argument("--rules", required=True, metavar="RULES.toml")
    p.add_argument("--tasks", required=True, metavar="FILE.jsonl")
    p.add_argument("--samples", type=_positive_int("--samples"), default=1, help="generations per prompt")
    p.add_argument("--max-tokens", type=_positive_int("--max-tokens"), default=256)
    p.add_argument("--dry-run", action="store_true", help="count steers per 1,000 tokens; write nothing")

    p = sub.add_parser(
        "doctor",
        help="check this machine (versions, CPU, llama.cpp, model, store, torch) and stream a few tokens",
        description="Print what a bug report needs and check that steering works here: versions, "
        "llama.cpp's CPU features and extra-buffer decision, the model, the store, the training stack, "
        "and a self-test that streams a few tokens in a child process. Exit 1 if anything is broken.",
    )
    _add_store(p)
    p.add_argument("--model", metavar="GGUF", help="model to self-test (default: the bundled model)")
    _add_extra_bufts(p)
    return parser


# ---------------------------------------------------------------------------------------
# commands


def _store(ns: argparse.Namespace):
    from steer_tui.core.store import Store

    return Store(ns.store) if ns.store else Store()


def cmd_list(ns: argparse.Namespace) -> int:
    from steer_tui.core.safe_text import visible

    store = _store(ns)
    tasks = store.list_tasks()
    if not tasks:
        print(f"no tasks in {store.tasks_dir}")
        return 0
    def v(x: str) -> str:  # ids, dates and titles come from files: show them inertly
        return visible(str(x), newlines=False, tabs=False)

    w = max(4, *(len(v(t.id)) for t in tasks))
    print(f"{'TASK':{w}} {'UPDATED':20} {'STEERS':>6} {'TOKENS':>7}  TITLE")
    for t in tasks:
        if t.error:
            print(f"{v(t.id):{w}} {'':20} {'':>6} {'':>7}  [unreadable] {v(t.error)}")
            continue
        print(f"{v(t.id):{w}} {v(t.updated_at):20} {t.n_steers:6d} {t.n_response_tokens:7d}  {v(t.title)}")
    return 0


def _load_task(ns: argparse.Namespace):
    from steer_tui.core.store import load_tree

    p = Path(ns.task)
    if p.suffix == ".json" and p.exists():
        return load_tree(p)
    return _store(ns).load(ns.task)


def cmd_show(ns: argparse.Namespace) -> int:
    from steer_tui.core.render import render_tree

    sys.stdout.write(render_tree(_load_task(ns)))
    return 0


def cmd_export(ns: argparse.Namespace) -> int:
    from steer_tui.core.export import export, iter_trees, llama_detokenizer
    from steer_tui.core.models import check_gguf
    from steer_tui.core.safe_text import visible

    sources = ns.sources or [_store(ns).tasks_dir]
    for s in sources:
        if not Path(s).exists():
            raise CliError(f"--from {s}: no such file or directory")
    detok = None
    if ns.format in ("dpo", "kto"):
        model = ns.model
        if model is None:
            probe: list[str] = []
            model = next((t.model.get("path") for t in iter_trees(sources, probe) if t.model.get("path")), None)
            if model and not Path(model).exists():
                model = None
        if model:
            detok = llama_detokenizer(check_gguf(model))
        else:
            print("steer-tui: no model vocabulary found; rejected text is the whole replaced node (pass --model)", file=sys.stderr)
    report = export(ns.format, sources, ns.out, detok=detok, rejected_tokens=ns.rejected_tokens)
    for err in report.skipped or []:
        print(f"steer-tui: skipped {visible(err)}", file=sys.stderr)
    print(f"wrote {report.rows} {ns.format} rows from {report.trees} tasks to {ns.out}")
    return 0


def cmd_session(ns: argparse.Namespace) -> int:
    from steer_tui.ui import supervisor

    if supervisor.is_child():
        supervisor.enable_crash_log()
    elif sys.stdin.isatty() and sys.stdout.isatty() and getattr(ns, "argv", None) is not None:
        # a native crash must not leave the user's terminal dead: run the app as a child
        from steer_tui.core.store import default_store_dir

        store = ns.store or str(default_store_dir())
        return supervisor.run_supervised(ns.argv, store=store)
    return _run_app(ns)


def _run_app(ns: argparse.Namespace) -> int:
    """Check ``steer-tui session``'s arguments, build the app and run it.

    Bad arguments (missing model, unknown task, unusable task file, bad config) raise the
    project's error types before the terminal is taken over; ``run_command`` prints them."""
    from steer_tui.core.models import check_gguf
    from steer_tui.core.store import Store, StoreError
    from steer_tui.core.tasks import load_task_queue
    from steer_tui.ui.app import make_app
    from steer_tui.ui.config import ConfigError, load_config
    from steer_tui.ui.session_factory import SessionFactory

    try:
        config = load_config()
    except ConfigError as exc:
        raise CliError(str(exc)) from None  # a user error: printed as one line
    if ns.model:
        check_gguf(ns.model)
    if ns.adapter:
        check_gguf(ns.adapter)
    store = Store(ns.store)
    if ns.task is not None and not store.exists(ns.task):
        raise StoreError(f"--task {ns.task!r}: no such task in {store.root} (steer-tui list shows them)")
    tasks, errors = load_task_queue(ns.tasks) if ns.tasks else (None, [])
    sampling = dict(config.sampling)
    for field in ("temperature", "seed", "max_tokens"):
        value = getattr(ns, field)
        if value is not None:
            sampling[field] = value

    def load_engine():
        from steer_tui.core.engine import open_engine

        return open_engine(
            ns.model,
            n_ctx=ns.n_ctx,
            n_gpu_layers=ns.n_gpu_layers,
            adapter=ns.adapter,
            seed=ns.seed,
            extra_bufts=ns.extra_bufts,
        )

    factory = SessionFactory(
        store=store,
        engine_loader=load_engine,
        sampling=sampling,
        annotator=ns.annotator or config.annotator,
        read_only=ns.read_only,
    )
    app = make_app(
        session_factory=factory,
        tasks=tasks,
        config=config,
        task_id=ns.task,
        prompt=ns.prompt,
        system=ns.system,
        raw=ns.raw,
        startup_messages=[f"skipped {e}" for e in errors],
    )
    try:
        code = app.run()
    finally:
        factory.close()
    return int(code or 0)


def cmd_doctor(ns: argparse.Namespace) -> int:
    from steer_tui.core.doctor import render, run_doctor

    checks = run_doctor(store=ns.store, model=ns.model, setting=ns.extra_bufts)
    sys.stdout.write(render(checks))
    return 1 if any(c.problem for c in checks) else 0


def cmd_auto(ns: argparse.Namespace) -> int:
    from steer_tui.auto_cli import run_auto_cli

    return run_auto_cli(ns)


COMMANDS = {
    "session": cmd_session,
    "list": cmd_list,
    "show": cmd_show,
    "export": cmd_export,
    "auto": cmd_auto,
    "doctor": cmd_doctor,
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = list(sys.argv[1:] if argv is None else argv)
    ns = parser.parse_args(args)
    ns.argv = args
    if ns.command is None:
        parser.print_help()
        return 0
    return run_command(ns)


def _extra_bufts_setting(flag: str | None) -> str:
    """--extra-bufts, else $STEER_EXTRA_BUFTS, else the config file's extra_bufts, else auto."""
    from steer_tui.core.llama_load import ProbeError, resolve_setting
    from steer_tui.ui.config import ConfigError, load_config

    try:
        configured = load_config().extra_bufts if flag is None else None
        return resolve_setting(flag, configured)
    except (ConfigError, ProbeError) as exc:
        raise CliError(str(exc)) from None


def run_command(ns: argparse.Namespace) -> int:
    """Run a parsed command, turning the project's own errors into one clear line."""
    from steer_tui.core.models import ModelNotFound
    from steer_tui.core.store import StoreError
    from steer_tui.core.tasks import TaskQueueError
    from steer_tui.core.tree import TreeError

    user_errors: tuple[type[BaseException], ...] = (CliError, StoreError, TreeError, ModelNotFound, TaskQueueError)
    try:
        from steer_tui.core.errors import EngineError
        from steer_tui.core.auto import RuleError
        from steer_tui.core.session_errors import SessionError

        user_errors += (EngineError, SessionError, RuleError)
    except ImportError:  # pragma: no cover - during bootstrap
        pass
    try:
        if hasattr(ns, "extra_bufts"):
            ns.extra_bufts = _extra_bufts_setting(ns.extra_bufts)
        return COMMANDS[ns.command](ns)
    except user_errors as exc:
        from steer_tui.core.safe_text import visible

        print(f"steer-tui: {visible(str(exc))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
