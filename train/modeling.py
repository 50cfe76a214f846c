"""Model loading for steer-train: resolve ``--model``, convert a GGUF once, find LoRA targets.

``--model`` may be

* a local ``FILE.gguf`` (the default: the model recorded in the trees, when it is a local
  GGUF). It is dequantized and converted **once** into a plain safetensors directory cached
  under ``$STEER_CACHE`` (default ``platformdirs.user_cache_dir("steer-tui")``)
  ``/models/<sha256 of the GGUF>`` and every run loads from there. The conversion
  (``train.gguf_config``, ``train.gguf_weights``) rebuilds the config from what llama.cpp
  reads for the architecture (rope scaling, attention scale, sliding windows, soft-capping,
  norm offsets...) so the training model computes what llama.cpp computes, or refuses the
  GGUF by name;
* a local Hugging Face model directory;
* a Hugging Face id, only if it is already in the local HF cache: nothing is ever downloaded
  (``local_files_only=True``).

Weights load with ``use_safetensors=True`` (no pickle); ``trust_remote_code`` only when asked.
A converted GGUF's shards are read rather than memory-mapped, so loading it in bf16 peaks near
the bf16 model's size, not 3x (``bench/convert_memory.py``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from steer_tui.core.gguf import is_gguf_magic
from steer_tui.core.store import file_sha256
from steer_tui.core.vocab import vocab_sha256

log = logging.getLogger(__name__)

SOURCE_FILE = "steer_source.json"  # written into a converted directory: where it came from


class ModelError(Exception):
    """A model cannot be resolved or loaded; the message says which and why."""


@dataclass(frozen=True)
class ModelSource:
    """Where the training model comes from.

    ``kind``: ``"gguf"`` (``path`` is the .gguf file), ``"dir"`` (HF directory) or ``"hub"``
    (``path`` is an HF id present in the local cache). ``sha256`` is the GGUF's digest."""

    kind: str
    path: str
    sha256: str | None = None

    @property
    def name(self) -> str:
        return Path(self.path).name if self.kind != "hub" else self.path


# ---------------------------------------------------------------------------- resolving


def is_gguf(path: str | os.PathLike[str]) -> bool:
    p = Path(path)
    try:
        with p.open("rb") as fh:
            return is_gguf_magic(fh.read(4))
    except OSError:
        return False


def resolve_model(spec: str | None, tree_models: Iterable[dict] = ()) -> ModelSource:
    """Turn ``--model`` (or, when None, the ``model`` blocks of the trees) into a ModelSource.

    Raises ModelError naming the argument and what is wrong."""
    if spec is None:
        paths = []
        for m in tree_models:
            p = (m or {}).get("path")
            if p and p not in paths:
                paths.append(p)
        usable = [p for p in paths if Path(p).is_file() and is_gguf(p)]
        if not usable:
            where = f" (the trees name {', '.join(map(repr, paths))})" if paths else ""
            raise ModelError(
                f"--model not given and no tree records a local GGUF model that exists{where}; "
                f"pass --model FILE.gguf, a Hugging Face model directory, or a cached HF id"
            )
        if len(usable) > 1:
            log.warning("trees were captured with %d different models; training %s", len(usable), usable[0])
        return ModelSource("gguf", str(Path(usable[0]).resolve()), file_sha256(usable[0]))
    p = Path(spec).expanduser()
    if p.is_file():
        if not is_gguf(p):
            raise ModelError(f"--model {spec!r} is a file but not a GGUF file (expected a .gguf or a directory)")
        return ModelSource("gguf", str(p.resolve()), file_sha256(p))
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise ModelError(f"--model {spec!r} is a directory without config.json (not a Hugging Face model)")
        return ModelSource("dir", str(p.resolve()))
    if spec.endswith(".gguf") or os.sep in spec and not _looks_like_hub_id(spec):
        raise ModelError(f"--model {spec!r} does not exist")
    if not _looks_like_hub_id(spec):
        raise ModelError(f"--model {spec!r} is neither an existing path nor a Hugging Face id")
    if not _in_hub_cache(spec):
        raise ModelError(
            f"--model {spec!r} is not in the local Hugging Face cache and steer-train never downloads; "
            f"fetch it yourself (e.g. `huggingface-cli download {spec}`) or pass a local directory / .gguf"
        )
    return ModelSource("hub", spec)


def _looks_like_hub_id(spec: str) -> bool:
    parts = spec.split("/")
    return 1 <= len(parts) <= 2 and all(parts) and not spec.startswith((".", "~", "/"))


def _in_hub_cache(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - transformers depends on it
        return False
    try:
        hit = try_to_load_from_cache(repo_id, "config.json")
    except Exception:  # invalid id etc.
        return False
    return isinstance(hit, str)


# ---------------------------------------------------------------------------- GGUF cache


def cache_root() -> Path:
    env = os.environ.get("STEER_CACHE")
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("steer-tui"))


@contextlib.contextmanager
def _file_lock(path: Path):
    """Exclusive inter-process lock (several DDP ranks may convert the same GGUF)."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def converted_dir(source: ModelSource) -> Path:
    assert source.kind == "gguf" and source.sha256
    return cache_root() / "models" / source.sha256


def convert_gguf(source: ModelSource) -> Path:
    """Convert ``source`` once into a cached safetensors model+tokenizer directory; return it.

    The config is rebuilt from what llama.cpp reads for the architecture (``train.gguf_config``):
    every feature that changes the computation is restored or the GGUF is refused with a
    ModelError naming the architecture and the feature. Concurrent callers (DDP ranks)
    serialize on a lock; the directory appears atomically (written under a temp name, then
    renamed). A conversion made by an older loader version is redone."""
    from train import gguf_model as G
    from train.gguf_config import build_config
    from train.gguf_weights import write_hf_model

    target = converted_dir(source)
    if _fresh(target):
        return target
    with _file_lock(target.parent / f"{source.sha256}.lock"):
        if _fresh(target):
            return target
        gguf = Path(source.path)
        log.info("converting %s to a cached safetensors model in %s (once)", gguf, target)
        try:
            meta = G.read_meta(gguf)
            plan = build_config(meta)
        except G.Unsupported as exc:
            raise ModelError(f"cannot train {gguf.name}: {exc}") from None
        except Exception as exc:
            raise ModelError(f"cannot read GGUF {str(gguf)!r}: {exc}") from exc
        tmp = Path(tempfile.mkdtemp(prefix=f".{source.sha256}.", dir=target.parent))
        try:
            try:
                write_hf_model(meta, plan, tmp)
            except G.Unsupported as exc:
                raise ModelError(f"cannot train {gguf.name}: {exc}") from None
            _save_gguf_tokenizer(gguf, tmp)
            info = {
                "gguf_path": str(gguf),
                "gguf_sha256": source.sha256,
                "architecture": meta.arch,
                "file_type": meta.file_type(),
                "loader": G.LOADER_VERSION,
                "restored": plan.notes,
                "weight_types": plan.weight_types,
            }
            (tmp / SOURCE_FILE).write_text(json.dumps(info, indent=2))
            if target.exists():
                shutil.rmtree(target)
            os.replace(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        for note in plan.notes:
            log.info("%s: %s", gguf.name, note)
        return target


def _fresh(target: Path) -> bool:
    from train.gguf_model import LOADER_VERSION

    f = target / SOURCE_FILE
    if not f.is_file():
        return False
    try:
        return json.loads(f.read_text()).get("loader") == LOADER_VERSION
    except (OSError, ValueError):
        return False


def _save_gguf_tokenizer(gguf: Path, out: Path) -> None:
    """transformers' tokenizer from the GGUF, saved beside the model (a warning if it cannot be
    built: training works on the trees' token ids). Building it takes seconds for a large
    vocabulary, so it is cached by the digest of the GGUF's tokenizer metadata (several
    quantisations of one model share it); the chat template is written from each GGUF."""
    from train.gguf_model import read_meta

    try:
        key = _tokenizer_digest(gguf)
        cached = cache_root() / "tokenizers" / key
        if not (cached / "tokenizer_config.json").is_file():
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=_mkdir(cached.parent)))
            tokenizer.save_pretrained(tmp)
            try:
                os.replace(tmp, cached)
            except OSError:  # another process won the race
                shutil.rmtree(tmp, ignore_errors=True)
        for f in cached.iterdir():
            if f.name != "chat_template.jinja":
                shutil.copy(f, out / f.name)
        template = read_meta(gguf).kv.get("tokenizer.chat_template")
        if isinstance(template, str) and template:  # not part of the cache key: written per GGUF
            (out / "chat_template.jinja").write_text(template, encoding="utf-8")
    except Exception as exc:
        log.warning("no tokenizer from %s (%s); training uses the trees' token ids", gguf.name, exc)


def _mkdir(p: Path) -> Path:
    p.mkdir(parents=True, exist_ok=True)
    return p


def _tokenizer_digest(gguf: Path) -> str:
    """sha256 over the GGUF's ``tokenizer.*`` metadata and the transformers version."""
    import transformers

    from train.gguf_model import read_meta

    return read_meta(gguf).tokenizer_digest(transformers.__version__)


def source_metadata(model_dir: str | os.PathLike[str]) -> dict:
    """The ``steer_source.json`` of a converted directory, or {}."""
    f = Path(model_dir) / SOURCE_FILE
    return json.loads(f.read_text()) if f.is_file() else {}


# ---------------------------------------------------------------------------- loading


def load_model(
    source: ModelSource,
    *,
    dtype=None,
    trust_remote_code: bool = False,
    load_in_4bit: bool = False,
) -> tuple[Any, Any, Path | str]:
    """Load ``(model, tokenizer, model_dir_or_id)`` for training.

    GGUF sources are converted once and loaded from the cache. Never downloads.
    ``load_in_4bit``: the Linear weights in NF4 (`train.quant.load_4bit`; for a GGUF, its
    converted directory is what gets quantized); ``dtype`` is then the compute dtype."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if load_in_4bit:
        from train.quant import require_bnb

        require_bnb()  # one line before any conversion or loading: bitsandbytes missing or unusable here
    if source.kind == "gguf":
        where: Path | str = convert_gguf(source)
    else:
        where = source.path
    kw = dict(local_files_only=True, trust_remote_code=trust_remote_code)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(where), **kw)
    except Exception as exc:  # a model without a tokenizer still trains on tree token ids
        log.warning("no tokenizer in %s (%s); using the trees' token ids as they are", where, exc)
        tokenizer = None
    try:
        if load_in_4bit:
            from train.quant import load_4bit

            model, info = load_4bit(where, dtype=dtype or torch.float32, trust_remote_code=trust_remote_code)
        elif source.kind == "gguf":
            model, info = _load_converted(Path(where), dtype or torch.float32)
        else:
            model, info = AutoModelForCausalLM.from_pretrained(
                str(where), dtype=dtype or torch.float32, use_safetensors=True, output_loading_info=True, **kw
            )
    except Exception as exc:
        hint = " (pass --trust-remote-code if you trust this model's code)" if "trust_remote_code" in str(exc) else ""
        raise ModelError(f"cannot load model {source.path!r}: {exc}{hint}") from exc
    check_loading_info(info, source.path)
    return model, tokenizer, where


def _load_converted(where: Path, dtype) -> tuple[Any, dict]:
    """``from_pretrained`` of a converted GGUF with its shards *read* (``pread``), not mapped.

    transformers maps every shard and keeps them all mapped until the whole model is loaded,
    so the float32 file pages (2x a bf16 model) would stay resident beside the weights; read,
    each float32 tensor lives only while it is cast (bench/convert_memory.py). The same
    ``from_pretrained`` does the loading: equal weights, buffers and loading report."""
    import transformers
    from safetensors import safe_open
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(where), local_files_only=True)
    model_class = getattr(transformers, config.architectures[0])  # one of gguf_model.SUPPORTED
    with contextlib.ExitStack() as files:
        state = {}
        for f in sorted(where.glob("*.safetensors")):
            shard = files.enter_context(safe_open(str(f), framework="pt", backend="pread"))
            state.update((k, shard.get_slice(k)) for k in shard.keys())
        model, info = model_class.from_pretrained(None, config=config, state_dict=state, dtype=dtype,
                                                  output_loading_info=True)
    model.name_or_path = model.config._name_or_path = str(where)
    return model, info


def check_loading_info(info: dict, what: str) -> None:
    """A weight the checkpoint does not provide would keep its random initialisation: error."""
    missing = sorted(info.get("missing_keys") or ())
    mismatched = sorted(str(k[0] if isinstance(k, (tuple, list)) else k) for k in (info.get("mismatched_keys") or ()))
    if missing or mismatched:
        bad = missing + mismatched
        raise ModelError(
            f"model {what!r}: {len(bad)} weight(s) "
            + ("missing from the checkpoint" if missing else "with the wrong shape")
            + f" would stay randomly initialised ({', '.join(bad[:5])}{', ...' if len(bad) > 5 else ''}); "
            "refusing to train a partly random model")


# ---------------------------------------------------------------------------- LoRA targets

ATTN_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "query", "key", "value", "c_attn", "out_proj", "dense")


def lora_target_modules(model, *, mlp: bool = True) -> list[str]:
    """Leaf names of the Linear layers inside the transformer blocks to put LoRA on.

    Found from the architecture: every ``nn.Linear`` whose qualified name contains a
    numbered block (``.layers.3.``/``.h.3.``) — attention projections, plus MLP projections
    when ``mlp`` — never the embeddings or ``lm_head``."""
    import re

    import torch.nn as nn

    in_block = re.compile(r"\.(\d+)\.")
    attn, other = set(), set()
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear) or not in_block.search(name):
            continue
        leaf = name.rsplit(".", 1)[-1]
        path = name.lower()
        if "attn" in path or "attention" in path or leaf in ATTN_NAMES[:5]:
            attn.add(leaf)
        else:
            other.add(leaf)
    if not attn and not other:
        raise ModelError(f"found no Linear layers inside transformer blocks of {type(model).__name__}")
    return sorted(attn | (other if mlp else set()))


# ---------------------------------------------------------------------------- vocabulary


def _byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode (byte-level BPE piece chars -> bytes)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def token_pieces(tokenizer) -> list[bytes]:
    """Byte string of every token id in id order, as llama.cpp renders pieces (special tokens as
    their text; byte-level BPE chars mapped back to bytes; sentencepiece ``▁`` as space and
    ``<0xNN>`` as that byte)."""
    dec = _byte_decoder()
    vocab_size = len(tokenizer)
    pieces: list[bytes] = []
    toks = tokenizer.convert_ids_to_tokens(list(range(vocab_size)))
    special = set(getattr(tokenizer, "all_special_tokens", []) or [])
    added = set(getattr(tokenizer, "get_added_vocab", dict)().keys())
    for tok in toks:
        if tok is None:
            pieces.append(b"")
        elif tok in special or tok in added:
            pieces.append(tok.encode("utf-8"))
        elif len(tok) == 6 and tok.startswith("<0x") and tok.endswith(">"):
            pieces.append(bytes([int(tok[3:5], 16)]))
        elif all(ch in dec for ch in tok):
            pieces.append(bytes(dec[ch] for ch in tok))
        else:
            pieces.append(tok.replace("▁", " ").encode("utf-8"))
    return pieces


def tokenizer_vocab_sha256(tokenizer) -> str:
    """The training tokenizer's vocabulary hash: the engine's own rule
    (``steer_tui.core.vocab.vocab_sha256``) over its token pieces, so equal hashes mean the
    trees' token ids can be trained on without retokenising."""
    return vocab_sha256(token_pieces(tokenizer))
