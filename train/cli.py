"""``steer-train``: train a LoRA adapter on steer trees; ``steer-train eval``: score one;
``steer-train check-model``: does the training model compute what llama.cpp computes?
``steer-train convert`` / ``export-gguf`` (``train.convert_cli``): a GGUF as a Hugging Face
directory for another trainer (TRL...), and that trainer's PEFT adapter as llama.cpp's LoRA GGUF.

Exit codes: 0 ok, 2 bad arguments / no usable data / unknown or unsupported model, 3 training
stopped (non-finite loss, out of memory), 4 the training model does not match llama.cpp's
(pre-training check; ``--allow-model-mismatch`` trains anyway), 1 unexpected error.
``check-model``: 0 match, 1 mismatch, 2 cannot check (bad arguments, unsupported model).
``convert``, ``export-gguf``: 0 written, 2 refused (bad file or argument, unsupported model or adapter).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import traceback
from pathlib import Path

from train.config import (ATTN_IMPLS, KL_MODES, LOSS_TYPES, OBJECTIVES, PACKINGS, ConfigError, TrainConfig, load_toml,
                          make_config)
from train.convert_cli import Refused, convert_main, export_main

log = logging.getLogger("steer-train")
_D = TrainConfig()


def _values(p: argparse.ArgumentParser, *flags: tuple[str, type]) -> None:
    """Options that take one value of a type and need no help text beyond their name (each
    a `TrainConfig` field; left unset, None, so the TOML or the default applies)."""
    for flag, typ in flags:
        p.add_argument(flag, type=typ)


def _train_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="steer-train",
        description="Train a LoRA adapter on steer trees (masked SFT + localized DPO). "
        "`steer-train eval --help` scores an adapter on held-out steers; "
        "`steer-train check-model --help` compares the training model with llama.cpp; "
        "`steer-train convert --help` / `export-gguf --help`: train with another trainer (TRL...).",
    )
    p.add_argument("--data", action="append", metavar="DIR|FILE", help="steer-tree dir (recursive *.json) or file; repeatable")
    p.add_argument("--out", metavar="DIR", help="output directory")
    p.add_argument("--model", metavar="HF_ID|DIR|FILE.gguf", help="default: the local GGUF recorded in the trees")
    p.add_argument("--config", metavar="FILE.toml", help="TOML with any of the options below (flags win)")
    p.add_argument("--objective", choices=OBJECTIVES)
    p.add_argument("--packing", choices=PACKINGS)
    _values(p, ("--max-steps", int), ("--epochs", float), ("--lr", float), ("--beta", float))
    p.add_argument("--loss-type", choices=LOSS_TYPES,
                   help="sigmoid (DPO, default), ipo, apo_zero (anchored), orpo (odds ratio, reference-free; adds "
                   "the chosen-span NLL with weight --rpo-alpha, 1 when unset)")
    p.add_argument("--label-smoothing", type=float)
    p.add_argument("--length-normalize", action="store_true", default=None)
    _values(p, ("--sft-weight", float), ("--dpo-weight", float))
    p.add_argument("--rpo-alpha", type=float, help="SFT term on the chosen span (RPO-style)")
    p.add_argument("--first-token-weight", type=float,
                   help="weight of each steer's first divergent token in the DPO span log-probs (default 1)")
    p.add_argument("--kl-weight", type=float, help="weight of the reference-KL term (--kl-mode) on model-written tokens")
    p.add_argument("--kl-mode", choices=KL_MODES,
                   help="full: exact KL(policy || base) over the vocabulary (one extra no-grad forward); forward: "
                   "exact KL(base || policy) (keeps mass on every token the base gives it: against repetition); "
                   "symmetric: the sum of the two; token: k3 estimate of KL(base || policy) from the sampled tokens only")
    _values(p, ("--lora-r", int), ("--lora-alpha", float), ("--lora-dropout", float))
    p.add_argument("--no-lora-mlp", dest="lora_mlp", action="store_false", default=None, help="LoRA on attention only")
    p.add_argument("--lora-layers", help="blocks that get LoRA: all (default), last:N, or 0-based 'A-B,C'")
    p.add_argument("--init-adapter", metavar="DIR",
                   help="go on training this LoRA adapter (a previous steer-train --out) instead of a fresh one")
    _values(p, ("--eval-fraction", float), ("--model-token-weight", float), ("--accepted-weight", float))
    p.add_argument("--chosen-continuation", type=int, metavar="N",
                   help="add the model's first N tokens after a correction to its chosen side (on-policy; default 0)")
    p.add_argument("--rejected-tokens", type=int, metavar="K",
                   help="the rejected side: the first K tokens of the cut text (default: as many as the chosen side)")
    _values(p, ("--max-length", int))
    p.add_argument("--batch-size", type=int, help="tasks per device per step")
    _values(p, ("--grad-accum", int), ("--token-budget", int), ("--save-steps", int), ("--seed", int))
    p.add_argument("--gradient-checkpointing", action="store_true", default=None)
    p.add_argument("--attn-impl", choices=ATTN_IMPLS,
                   help="attention kernel (default auto: sdpa; eager for models with attention softcapping, "
                   "flex for those on CUDA)")
    p.add_argument("--ignore-memory-check", dest="memory_check", action="store_false", default=None,
                   help="train even when the estimated peak memory exceeds what the device has free")
    p.add_argument("--fp32", dest="bf16", action="store_false", default=None, help="no bf16 even on a GPU")
    p.add_argument("--load-in-4bit", action="store_true", default=None,
                   help="QLoRA: load the frozen base weights in 4-bit NF4 (bitsandbytes: `pip install bitsandbytes`); "
                   "the adapter still exports for the GGUF")
    p.add_argument("--resume", action="store_true", default=None)
    p.add_argument("--merge", action="store_true", default=None, help="also write a merged HF model to OUT/merged")
    p.add_argument("--no-gguf", dest="export_gguf", action="store_false", default=None)
    p.add_argument("--trust-remote-code", action="store_true", default=None)
    p.add_argument("--allow-model-mismatch", action="store_true",
                   help="train even if the pre-training check finds that the training model does not compute what "
                        "llama.cpp computes from the GGUF (see `steer-train check-model`)")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=None)
    p.add_argument("-q", "--quiet", action="store_true")
    return p


def _check_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="steer-train check-model",
        description="Load MODEL.gguf both ways, with llama.cpp and with steer-train's loader, and compare the "
        "next-token log-probs of a fixed text at every position (and, with --adapter, the adapter's effect: "
        "llama.cpp base+adapter.gguf vs the PEFT adapter it was exported from). Prints the largest "
        "difference and the verdict; exit 0 match, 1 mismatch, 2 cannot check (unsupported model...).")
    p.add_argument("model", metavar="MODEL.gguf")
    p.add_argument("--adapter", metavar="A.gguf|DIR",
                   help="adapter.gguf (its directory must hold the PEFT adapter) or a steer-train --out directory")
    p.add_argument("--tokens", type=int, metavar="N",
                   help="score N tokens (the fixed text repeated; default: the text once, ~200 tokens)")
    p.add_argument("--trust-remote-code", action="store_true")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    return p


def _eval_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="steer-train eval", description="Steer accuracy, reward margin and first-token "
                                "accuracy of a model (+ adapter) on the steers in --data, before vs after.")
    p.add_argument("--data", action="append", required=True, metavar="DIR|FILE")
    p.add_argument("--model", metavar="HF_ID|DIR|FILE.gguf")
    p.add_argument("--adapter", metavar="DIR", help="PEFT adapter directory (a steer-train --out)")
    p.add_argument("--beta", type=float, default=_D.beta)
    p.add_argument("--packing", choices=PACKINGS, default=_D.packing)
    p.add_argument("--eval-fraction", type=float, default=0.0,
                   help="score only the held-out split a training run with this fraction/seed used (default: all)")
    p.add_argument("--seed", type=int, default=_D.seed)
    p.add_argument("--trust-remote-code", action="store_true")
    p.add_argument("--json", action="store_true", help="print JSON only")
    return p


def _setup_logging(quiet: bool) -> None:
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _fail(msg: str, code: int = 2) -> int:
    print(f"steer-train: error: {msg}", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    if argv and argv[0] == "eval":
        return eval_main(argv[1:])
    if argv and argv[0] == "check-model":
        return check_main(argv[1:])
    if argv and argv[0] in ("convert", "export-gguf"):
        _setup_logging(True)
        run = convert_main if argv[0] == "convert" else export_main
        try:
            return run(argv[1:])
        except Refused as exc:
            return _fail(str(exc))
    args = _train_parser().parse_args(argv)
    _setup_logging(args.quiet)
    try:
        file_values = load_toml(args.config) if args.config else {}
        given = {k: v for k, v in vars(args).items() if k not in ("config", "quiet", "allow_model_mismatch")}
        cfg = make_config(file_values, **given)
        if not cfg.data:
            raise ConfigError("--data is required (a directory of steer trees, e.g. <store>/tasks)")
        if not cfg.out:
            raise ConfigError("--out is required")
    except ConfigError as exc:
        return _fail(str(exc))
    return _run(cfg, allow_model_mismatch=args.allow_model_mismatch)


def _run(cfg: TrainConfig, *, allow_model_mismatch: bool = False) -> int:
    try:
        import torch.distributed as dist

        from train.distributed import finish_process_group
        from train.run import is_main_process
    except ImportError as exc:
        return _fail(f"the training extra is not installed ({exc}); run `pip install 'steer[train]'`")
    had_group = dist.is_available() and dist.is_initialized()
    try:
        code, metrics = _train(cfg, allow_model_mismatch)
    finally:  # the run's objects are gone by now (an error in flight had its frames cleared)
        finish_process_group(had_group)
    if code == 0 and is_main_process():
        _print_summary(cfg, metrics)
    return code


def _train(cfg: TrainConfig, allow_model_mismatch: bool) -> tuple[int, dict]:
    """`train.run.run_training` with its errors turned into exit codes: ``(code, metrics)``.
    An unexpected error is raised with the frames of the run cleared, so the trainer and its
    DDP/FSDP objects are freed before `_run` destroys the process group."""
    from train.check import ModelMismatch
    from train.data import DataError
    from train.memory import MemoryRefused
    from train.modeling import ModelError
    from train.run import run_training
    from train.trainer import NonFiniteLoss

    try:
        return 0, run_training(cfg, allow_model_mismatch=allow_model_mismatch)
    except ModelMismatch as exc:
        return _fail(str(exc), 4), {}
    except (DataError, ModelError, ConfigError) as exc:
        return _fail(str(exc)), {}
    except MemoryRefused as exc:
        return _fail(str(exc), 3), {}
    except NonFiniteLoss as exc:
        return _fail(str(exc), 3), {}
    except Exception as exc:  # OOM has no common base class across backends
        if _is_oom(exc):
            return _fail(
                f"out of memory ({type(exc).__name__}). Try --batch-size 1, --token-budget 1024, "
                "--gradient-checkpointing, --max-length, a smaller --lora-r, or --packing tree", 3), {}
        traceback.clear_frames(exc.__traceback__)
        raise


def _is_oom(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, (MemoryError, torch.OutOfMemoryError)) or "out of memory" in str(exc).lower()


def _print_summary(cfg: TrainConfig, m: dict) -> None:
    d = m["data"]
    print(f"trained {m['train']['global_step']} steps on {d['train_tasks']} tasks / {d['train_steers']} steers "
          f"in {m['train']['seconds']:.1f}s ({m['train']['steps_per_second']:.3f} steps/s)")
    ev = m.get("eval")
    if ev and ev["before"].get("steers"):
        b, a = ev["before"], ev["after"]
        print(f"held-out ({b['steers']} steers in {d['eval_tasks']} tasks):  before -> after")
        for k in ("steer_accuracy", "first_token_accuracy", "reward_margin"):
            print(f"  {k:22s} {b[k]:8.3f} -> {a[k]:8.3f}")
    else:
        print("no held-out steers (use --eval-fraction with more than one task)")
    print(f"outputs in {cfg.out}: adapter_model.safetensors, adapter_config.json, metrics.json, training.png"
          + (", adapter.gguf" if m.get("adapter_gguf") else ""))


def eval_main(argv: list[str]) -> int:
    args = _eval_parser().parse_args(argv)
    _setup_logging(args.json)
    from train import data as D
    from train.data import DataError
    from train.evaluate import evaluate_tasks
    from train.modeling import ModelError, load_model, resolve_model, tokenizer_vocab_sha256
    from train.retokenize import VocabCheck

    try:
        rep = D.load_trees(args.data)
        source = resolve_model(args.model, D.tree_models(rep.trees))
        model, tok, _ = load_model(source, trust_remote_code=args.trust_remote_code)
        if args.adapter:
            ad = Path(args.adapter)
            if not (ad / "adapter_config.json").is_file():
                raise ModelError(f"--adapter {args.adapter!r} has no adapter_config.json (expected a steer-train --out)")
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, str(ad))
        vocab = VocabCheck(tokenizer=tok, model_sha256=source.sha256,
                           vocab_sha256=tokenizer_vocab_sha256(tok) if tok else None)
        ds = D.build_dataset(trees=rep.trees, vocab=vocab, eval_fraction=args.eval_fraction, seed=args.seed,
                             objective="dpo")
    except (DataError, ModelError) as exc:
        return _fail(str(exc))
    tasks = ds.eval if args.eval_fraction > 0 else ds.train + ds.eval
    res = evaluate_tasks(model, tasks, beta=args.beta, packing=args.packing)
    res["tasks"] = len(tasks)
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        b, a = res["before"], res["after"]
        print(f"{b['steers']} steers in {len(tasks)} tasks        base -> " + ("adapter" if args.adapter else "base"))
        for k in ("steer_accuracy", "first_token_accuracy", "reward_margin"):
            print(f"  {k:22s} {b[k]:8.3f} -> {a[k]:8.3f}")
    return 0


def check_main(argv: list[str]) -> int:
    args = _check_parser().parse_args(argv)
    _setup_logging(True)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    from train.check import CheckError, check_model
    from train.modeling import ModelError

    if args.tokens is not None and args.tokens < 2:
        return _fail("--tokens must be >= 2")
    try:
        rep = check_model(args.model, adapter=args.adapter, n_tokens=args.tokens,
                          trust_remote_code=args.trust_remote_code)
    except (CheckError, ModelError) as exc:
        return _fail(str(exc))
    if args.json:
        print(json.dumps(rep.to_dict(), indent=2))
    else:
        print("\n".join(rep.lines()))
    return 0 if rep.ok else 1


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
