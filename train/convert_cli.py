"""``steer-train convert`` and ``steer-train export-gguf``: the two commands that let another
trainer (TRL, ...) train the model llama.cpp runs and hand its adapter back to ``steer-tui``.

* ``convert MODEL.gguf --out DIR``: the Hugging Face directory steer-train itself trains on
  (``train.modeling.convert_gguf``: config rebuilt from what llama.cpp reads, weights
  dequantized, tokenizer and chat template from the GGUF) placed in ``DIR``, hard-linked from
  the cache when on the same filesystem, else copied.
* ``export-gguf PEFT_DIR [--model BASE] [--out FILE]``: a PEFT LoRA adapter on that base
  written as llama.cpp's LoRA GGUF (``train.export.export_lora_gguf``), plus the Ollama
  Modelfile when the base is a GGUF.

Both exit 0 done, 2 refused: they raise :class:`Refused` (one line naming the file or argument
and what is wrong) and ``train.cli.main`` prints it.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import shutil
from pathlib import Path

log = logging.getLogger("steer-train")


class Refused(Exception):
    """A command cannot do what was asked; the message names the file or argument and why."""


def _convert_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="steer-train convert",
        description="Write MODEL.gguf as a Hugging Face model directory (config.json, safetensors, tokenizer, "
        "chat template) that AutoModelForCausalLM.from_pretrained and TRL load as they are, computing what "
        "llama.cpp computes from the GGUF. Exit 0 done, 2 refused.")
    p.add_argument("model", metavar="MODEL.gguf")
    p.add_argument("--out", required=True, metavar="DIR", help="the model directory to write (new or empty)")
    p.add_argument("--force", action="store_true",
                   help="write into DIR even if it is not empty (the conversion's files are replaced)")
    return p


def _export_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="steer-train export-gguf",
        description="Write a PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors, what "
        "TRL's save_pretrained writes) as llama.cpp's LoRA GGUF, to load with `steer-tui session --adapter`. "
        "Exit 0 done, 2 refused.")
    p.add_argument("peft_dir", metavar="PEFT_DIR")
    p.add_argument("--model", metavar="BASE",
                   help="the base model: a directory from `steer-train convert`, a GGUF, a Hugging Face directory "
                   "or cached id (default: adapter_config.json's base_model_name_or_path)")
    p.add_argument("--out", metavar="FILE", help="default: PEFT_DIR/adapter.gguf")
    p.add_argument("--trust-remote-code", action="store_true")
    return p


# ---------------------------------------------------------------------------- convert


def convert_main(argv: list[str]) -> int:
    """``steer-train convert``; raises :class:`Refused`."""
    args = _convert_parser().parse_args(argv)
    from train.modeling import ModelError, ModelSource, convert_gguf, file_sha256, is_gguf, source_metadata

    gguf, out = Path(args.model).expanduser(), Path(args.out).expanduser()
    if not gguf.is_file():
        raise Refused(f"MODEL {args.model!r} is not a file (expected a .gguf file)")
    if not is_gguf(gguf):
        raise Refused(f"MODEL {args.model!r} is not a GGUF file (it does not start with the GGUF magic)")
    if out.exists() and not out.is_dir():
        raise Refused(f"--out {args.out!r} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not args.force:
        raise Refused(f"--out {args.out!r} exists and is not empty (pass --force to write into it)")
    try:
        cached = convert_gguf(ModelSource("gguf", str(gguf.resolve()), file_sha256(gguf)))
    except ModelError as exc:
        raise Refused(str(exc)) from None
    out.mkdir(parents=True, exist_ok=True)
    how = place_files(cached, out)
    info = source_metadata(out)
    print(f"{gguf.name} ({info.get('architecture')}, {info.get('file_type')}) -> {out}: "
          f"{how} from the conversion cache {cached}")
    if "hard-linked" in how:
        print("           (hard links into the cache: save a fine-tuned model to another directory, not over these)")
    for note in info.get("restored") or []:
        print(f"restored   {note}")
    print(f"load it:   AutoModelForCausalLM.from_pretrained({str(out)!r})  (and AutoTokenizer, same directory)")
    return 0


def place_files(src: Path, dst: Path) -> str:
    """Every file of ``src`` in ``dst``: hard links when both are on one filesystem, else
    copies; stale model shards of an earlier conversion in ``dst`` are removed (they would be
    loaded too). A linked file *is* the cache's file: writing one in place changes the cache, so
    the output tells users to save a changed model elsewhere. Returns "N files hard-linked" or
    "N files copied"."""
    names = {f.name for f in src.iterdir() if f.is_file()}
    for old in dst.iterdir():
        if old.name not in names and old.is_file() and (
                old.name.endswith(".safetensors") or old.name.endswith(".safetensors.index.json")):
            old.unlink()
    linked = copied = 0
    for name in sorted(names):
        s, d = src / name, dst / name
        if d.exists() or d.is_symlink():
            d.unlink()
        try:
            os.link(s, d)
            linked += 1
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
                raise
            shutil.copyfile(s, d)
            copied += 1
    if copied and linked:
        return f"{linked} files hard-linked, {copied} copied (another filesystem)"
    return f"{linked} files hard-linked" if linked else f"{copied} files copied (another filesystem)"


# ---------------------------------------------------------------------------- export-gguf


def export_main(argv: list[str]) -> int:
    """``steer-train export-gguf``; raises :class:`Refused`."""
    args = _export_parser().parse_args(argv)
    from train.export import ExportError
    from train.modeling import ModelError

    try:
        out, base_gguf, n, modelfile = _export(args)
    except (ModelError, ExportError) as exc:
        raise Refused(str(exc)) from None
    print(f"wrote {out} ({n} LoRA pairs)")
    if modelfile:
        print(f"wrote {modelfile} (Ollama: ollama create NAME -f {modelfile})")
    print(f"use it:    steer-tui session --model {base_gguf or 'BASE.gguf'} --adapter {out}")
    return 0


def _export(args) -> tuple[Path, str | None, int, Path | None]:
    """Load the base and the adapter, write the GGUF: (path, base GGUF or None, LoRA pairs,
    Modelfile or None). Raises ModelError / ExportError naming what is wrong."""
    from train.export import ExportError, export_lora_gguf, lora_state
    from train.modeling import ModelError, load_model, resolve_model, source_metadata

    peft_dir = Path(args.peft_dir).expanduser()
    if not peft_dir.is_dir():
        raise ModelError(f"PEFT_DIR {args.peft_dir!r} is not a directory")
    cfg_file = peft_dir / "adapter_config.json"
    if not cfg_file.is_file():
        raise ModelError(f"PEFT_DIR {args.peft_dir!r} has no adapter_config.json (not a PEFT adapter directory)")
    try:
        pcfg = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelError(f"{cfg_file}: cannot read it as JSON ({exc})") from None
    if str(pcfg.get("peft_type", "")).upper() != "LORA":
        raise ExportError(f"{cfg_file}: peft_type {pcfg.get('peft_type')!r}, only LORA adapters can be exported")
    if pcfg.get("modules_to_save"):
        raise ExportError(f"{cfg_file}: modules_to_save {pcfg['modules_to_save']} (fully trained modules) cannot be "
                          "expressed in llama.cpp's LoRA format")
    base = args.model or pcfg.get("base_model_name_or_path")
    if not base:
        raise ModelError(f"{cfg_file} names no base_model_name_or_path; pass --model BASE")
    try:
        source = resolve_model(str(base))
    except ModelError as exc:
        raise ModelError(f"base model {base!r} (from {'--model' if args.model else cfg_file.name}): {exc}") from None
    model, _tok, where = load_model(source, trust_remote_code=args.trust_remote_code)
    info = source_metadata(where) if source.kind != "hub" else {}
    from peft import PeftModel

    try:
        pm = PeftModel.from_pretrained(model, str(peft_dir))
    except (ValueError, KeyError, RuntimeError, OSError) as exc:
        raise ModelError(f"cannot apply the adapter in {peft_dir} to {base!r}: {exc}") from None
    n_pairs = len(lora_state(pm)[0])  # refuses rsLoRA/DoRA/embedding LoRA before writing
    out = Path(args.out).expanduser() if args.out else peft_dir / "adapter.gguf"
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        export_lora_gguf(pm, out, arch=info.get("architecture"))
    except ExportError as exc:
        raise ExportError(f"{peft_dir}: {exc}") from None
    base_gguf = source.path if source.kind == "gguf" else _source_gguf(info, where)
    modelfile = None
    if base_gguf:
        from train.modelfile import write_modelfile

        modelfile = write_modelfile(out.parent, base_gguf, out)
    return out, base_gguf, n_pairs, modelfile


def _source_gguf(info: dict, where) -> str | None:
    """The GGUF a converted directory came from (its ``steer_source.json``), if it is still
    there with the same bytes; else None, with a warning saying why."""
    from train.modeling import file_sha256

    path = info.get("gguf_path")
    if not path:
        return None
    if not Path(path).is_file():
        log.warning("%s was converted from %s, which no longer exists: no Modelfile", where, path)
        return None
    if info.get("gguf_sha256") and file_sha256(path) != info["gguf_sha256"]:
        log.warning("%s was converted from %s, which has changed since: no Modelfile (the adapter is for the "
                    "converted model, not the file there now)", where, path)
        return None
    return path
