"""Tiny random models of the families users bring, converted by llama.cpp's own converter.

Each family is a 2-layer (Gemma-3: 6, the smallest with a global layer under llama.cpp's
fixed 5:1 pattern), hidden-size-64 random model with the feature that family's GGUFs need
restored (llama3 rope scaling, q/k/v biases, q/k norms, soft-capping, sliding windows,
partial rotary + LongRoPE...), the bundled model's tokenizer (loaded from the bundled GGUF
with transformers) and the family's real chat template (from llama.cpp's
``models/templates``). Weights are drawn with a large std so the next-token distributions
are peaked: a config mistake moves them by nats, not by 1e-4.

The converter is ``vendor/llama.cpp/convert_hf_to_gguf.py`` (with its own ``gguf-py``) from
the llama-cpp-python source distribution of the installed version, fetched with pip
(``pip download --no-deps --no-binary :all: llama-cpp-python==X``: from pip's cache when the
wheel was built here, from PyPI otherwise) and extracted once into ``.cache/`` of the
checkout. :func:`converter_root` raises :class:`ConverterUnavailable` with what failed.

Three small adjustments let the converter take the same tokenizer.json-only BPE tokenizer for
every family: a missing ``tokenizer.model`` raises ``FileNotFoundError`` (what the converter
expects) instead of importing sentencepiece; Gemma-2's vocab goes through the converter's own
GPT-2 path (its real vocab is sentencepiece); the tokenizer.json is read as it is
(transformers 5's ``AutoTokenizer`` would rebuild e.g. a ``Qwen2Tokenizer`` from the model
type, whose pre-tokenizer the converter then does not recognise). The model conversion
itself is not touched.

Used by tests/train/test_families.py and bench/families.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[2]
HIDDEN = 64
STD = 0.25  # init std: peaked next-token distributions (see the module doc)


class ConverterUnavailable(RuntimeError):
    pass


@dataclass(frozen=True)
class Family:
    name: str
    make: Callable[[], Any]            # -> a transformers model (random weights)
    template: str | None               # llama.cpp models/templates/<name>.jinja
    refused: str | None = None         # substring of the loader's refusal (None: supported)
    permuted: bool = False             # llama-style q/k rows in the GGUF
    tokenizer_class: str | None = None  # tokenizer_config override the converter needs
    what: str = ""


def _cfg_common(**kw):
    base = dict(vocab_size=49152, hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                initializer_range=STD, bos_token_id=1, eos_token_id=2, rms_norm_eps=1e-6)
    base.update(kw)
    return base


def _model(cls_name: str, cfg_name: str, **kw):
    import torch
    import transformers

    torch.manual_seed(0)
    cfg = getattr(transformers, cfg_name)(**_cfg_common(**kw))
    model = getattr(transformers, cls_name)(cfg)
    with torch.no_grad():  # norms away from exactly 1 (Gemma: 0), so their offsets matter
        for n, p in model.named_parameters():
            if "norm" in n:
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def _llama():
    return _model("LlamaForCausalLM", "LlamaConfig", tie_word_embeddings=True, rope_theta=10000.0)


def _llama3():
    # llama3 scaling with a small original context (64) so that it changes short texts
    return _model("LlamaForCausalLM", "LlamaConfig", tie_word_embeddings=False,
                  rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 64})


def _mistral():
    # untied, explicit head_dim 32 != hidden/heads (Mistral-Nemo style)
    return _model("MistralForCausalLM", "MistralConfig", tie_word_embeddings=False, head_dim=32,
                  sliding_window=None, rope_theta=1000000.0)


def _qwen2():
    return _model("Qwen2ForCausalLM", "Qwen2Config", tie_word_embeddings=False, rope_theta=1000000.0)


def _qwen3():
    return _model("Qwen3ForCausalLM", "Qwen3Config", tie_word_embeddings=True, head_dim=32, rope_theta=1000000.0)


def _gemma2():
    # soft-capping values small enough to bite on these scores and logits
    return _model("Gemma2ForCausalLM", "Gemma2Config", head_dim=16, query_pre_attn_scalar=16, sliding_window=8,
                  attn_logit_softcapping=5.0, final_logit_softcapping=8.0, rope_theta=10000.0)


def _gemma3():
    return _model("Gemma3ForCausalLM", "Gemma3TextConfig", num_hidden_layers=6, head_dim=16, query_pre_attn_scalar=16,
                  sliding_window=8, rope_parameters={
                      "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0},
                      "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}})


def _phi3():
    return _model("Phi3ForCausalLM", "Phi3Config", num_key_value_heads=4, tie_word_embeddings=False,
                  max_position_embeddings=131072, original_max_position_embeddings=4096, sliding_window=None,
                  rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
                                   "short_factor": [1.0, 1.5, 3.0, 6.0], "long_factor": [1.0, 4.0, 12.0, 40.0]},
                  pad_token_id=2)


def _mixtral():
    return _model("MixtralForCausalLM", "MixtralConfig", num_local_experts=4, num_experts_per_tok=2,
                  tie_word_embeddings=False)


FAMILIES: dict[str, Family] = {f.name: f for f in [
    Family("llama", _llama, "meta-llama-Llama-3.2-3B-Instruct", permuted=True, what="SmolLM2-like, tied embeddings"),
    Family("llama3", _llama3, "meta-llama-Llama-3.1-8B-Instruct", permuted=True, what="llama3 rope scaling (rope_freqs)"),
    Family("mistral", _mistral, "mistralai-Mistral-Nemo-Instruct-2407", permuted=True, what="head_dim 32 != 64/4, untied"),
    Family("qwen2", _qwen2, "Qwen-Qwen2.5-7B-Instruct", what="q/k/v biases"),
    Family("qwen3", _qwen3, "Qwen-Qwen3-0.6B", what="q/k norms, head_dim 32"),
    Family("gemma2", _gemma2, "google-gemma-2-2b-it", what="soft-capping 5/8, sliding window 8, norm offsets"),
    Family("gemma3", _gemma3, "google-gemma-2-2b-it",
           what="5 local (window 8, base 1e4) + 1 global layer (linear x8), scalar 16"),
    Family("phi3", _phi3, "microsoft-Phi-3.5-mini-instruct", tokenizer_class="GPT2Tokenizer",
           what="partial rotary 8/16, LongRoPE"),
    Family("mixtral", _mixtral, None, refused="mixture-of-experts", permuted=True, what="MoE, 4 experts"),
]}


# ---------------------------------------------------------------------------- converter


def llama_cpp_version() -> str:
    import llama_cpp

    return llama_cpp.__version__


def converter_root(cache: Path | None = None) -> Path:
    """``vendor/llama.cpp`` of the llama-cpp-python sdist matching the installed version
    (``convert_hf_to_gguf.py``, ``conversion/``, ``gguf-py/``, ``models/templates/``),
    downloaded with pip and extracted once."""
    ver = llama_cpp_version()
    cache = Path(cache or os.environ.get("STEER_CONVERTER_CACHE") or REPO / ".cache" / "llama-cpp-converter")
    root = cache / ver / "llama.cpp"
    if (root / "convert_hf_to_gguf.py").is_file() and (root / ".complete").is_file():
        return root
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               f"llama-cpp-python=={ver}", "-d", tmp, "-q"]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        sdists = list(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
        if r.returncode != 0 or not sdists:
            raise ConverterUnavailable(
                f"could not fetch the llama-cpp-python {ver} source distribution for llama.cpp's converter "
                f"({' '.join(cmd)} exited {r.returncode}: {(r.stderr or r.stdout).strip()[-400:]})")
        prefix = f"{sdists[0].name.removesuffix('.tar.gz')}/vendor/llama.cpp/"
        wanted = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/", "models/templates/")
        staging = Path(tmp) / "x"
        with tarfile.open(sdists[0]) as tar:
            members = [m for m in tar.getmembers()
                       if m.name.startswith(prefix) and m.name[len(prefix):].startswith(wanted)
                       and (m.isfile() or m.isdir())]
            if not any(m.name.endswith("convert_hf_to_gguf.py") for m in members):
                raise ConverterUnavailable(f"{sdists[0].name} has no vendor/llama.cpp/convert_hf_to_gguf.py")
            tar.extractall(staging, members=members, filter="data")
        if root.exists():
            shutil.rmtree(root)
        root.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(staging / prefix), str(root))
        (root / ".complete").write_text(sdists[0].name)
    return root


CONVERT_WRAPPER = '''
import sys, runpy
from pathlib import Path
root = Path(sys.argv[1])
sys.path[:0] = [str(root / "gguf-py"), str(root)]
from conversion.base import TextModel
_sp = TextModel._set_vocab_sentencepiece
def _sentencepiece(self, *a, **k):
    if not (self.dir_model / "tokenizer.model").is_file():
        raise FileNotFoundError(self.dir_model / "tokenizer.model")
    return _sp(self, *a, **k)
TextModel._set_vocab_sentencepiece = _sentencepiece
from conversion.gemma import Gemma2Model
def _gemma2_vocab(self):
    self._set_vocab_gpt2()
    self.gguf_writer.add_add_space_prefix(False)
Gemma2Model.set_vocab = _gemma2_vocab
import transformers
_auto = transformers.AutoTokenizer.from_pretrained
def _tokenizer_json_as_is(path, *a, **k):
    p = Path(path)
    if (p / "tokenizer.json").is_file() and not (p / "tokenizer.model").is_file():
        return transformers.PreTrainedTokenizerFast.from_pretrained(path, *a, **k)
    return _auto(path, *a, **k)
transformers.AutoTokenizer.from_pretrained = _tokenizer_json_as_is
conv = runpy.run_path(str(root / "convert_hf_to_gguf.py"), run_name="steer_convert")
jobs = sys.argv[2:]
for src, out, outtype in zip(jobs[0::3], jobs[1::3], jobs[2::3]):
    sys.argv = ["convert_hf_to_gguf.py", src, "--outfile", out, "--outtype", outtype]
    conv["main"]()
'''


def convert(root: Path, jobs: list[tuple[Path, Path, str]]) -> None:
    """Run llama.cpp's converter on ``(hf_dir, out.gguf, outtype)`` jobs in one process."""
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as fh:
        fh.write(CONVERT_WRAPPER)
    try:
        args = [sys.executable, fh.name, str(root)] + [str(x) for job in jobs for x in job]
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        r = subprocess.run(args, capture_output=True, text=True, timeout=900, env=env)
    finally:
        os.unlink(fh.name)
    if r.returncode != 0:
        raise RuntimeError(f"convert_hf_to_gguf failed:\n{r.stderr[-3000:]}")


# ---------------------------------------------------------------------------- building


def bundled_tokenizer(dest: Path) -> Path:
    """The bundled model's tokenizer, loaded from its GGUF with transformers and saved."""
    if (dest / "tokenizer.json").is_file():
        return dest
    from transformers import AutoTokenizer

    from steer_tui.core.models import default_model_path

    p = default_model_path()
    tok = AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
    tok.save_pretrained(dest)
    return dest


def build(root: Path, names: list[str] | None = None, *, converter: Path | None = None,
          outtype: str = "f32") -> dict[str, dict[str, Path]]:
    """Write ``root/<family>/hf`` (HF model + tokenizer + template) and convert each to
    ``root/<family>/model-<outtype>.gguf``. Returns ``{family: {"hf": dir, "gguf": file}}``."""
    conv = converter or converter_root()
    tok = bundled_tokenizer(root / "_tokenizer")
    names = names or list(FAMILIES)
    jobs, out = [], {}
    for name in names:
        fam = FAMILIES[name]
        hf = root / name / "hf"
        gguf = root / name / f"model-{outtype}.gguf"
        out[name] = {"hf": hf, "gguf": gguf}
        if gguf.is_file():
            continue
        if not (hf / "config.json").is_file():
            fam.make().save_pretrained(hf, safe_serialization=True)
            for f in tok.iterdir():
                shutil.copy(f, hf / f.name)
            tc = json.loads((hf / "tokenizer_config.json").read_text())
            if fam.template:
                (hf / "chat_template.jinja").write_text((conv / "models" / "templates" / f"{fam.template}.jinja").read_text())
            if fam.tokenizer_class:
                tc["tokenizer_class"] = fam.tokenizer_class
            (hf / "tokenizer_config.json").write_text(json.dumps(tc, indent=2))
        jobs.append((hf, gguf, outtype))
    if jobs:
        convert(conv, jobs)
    return out


def digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:12]


# ---------------------------------------------------------------------------- measuring


def random_lora(model, out_dir: Path, *, seed: int = 0, std: float = 0.02, permute_qk: bool | None = None) -> Path:
    """A random, nonzero PEFT LoRA (r=4 on every projection) on ``model``: saved in ``out_dir``
    with its ``adapter.gguf`` export; ``model`` is left without it."""
    import torch

    from train.config import make_config
    from train.export import export_lora_gguf
    from train.model_setup import build_peft_model

    cfg = make_config(data=["x"], out="x", lora_r=4, lora_alpha=8, lora_dropout=0.0)
    pm = build_peft_model(model, cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    out_dir = Path(out_dir)
    pm.save_pretrained(out_dir)
    try:
        export_lora_gguf(pm, out_dir / "adapter.gguf", permute_qk=permute_qk)
    finally:
        pm.unload()
    return out_dir


def measure(name: str, paths: dict[str, Path], work: Path) -> dict[str, Any]:
    """Loader and export fidelity of one family on its f32 GGUF (what docs/training.md tabulates):

    * ``loader``: max |log p_llama.cpp - log p_train| over the check text (training loader on the GGUF);
    * ``export_gguf`` / ``export_dir``: max |delta_llama.cpp - delta_peft| of a random LoRA trained
      on the GGUF-loaded / the HF-directory model, exported to adapter.gguf;
    * ``wrong_permutation``: the same with the q/k row permutation deliberately inverted (must fail);
    * ``effect``: the adapter's largest effect (nats), so the export figures mean something.

    A refused family gives ``{"refused": message}``."""
    from train.check import check_model
    from train.modeling import ModelError, ModelSource, load_model, resolve_model, source_metadata

    fam = FAMILIES[name]
    gguf = paths["gguf"]
    try:
        model, _tok, where = load_model(resolve_model(str(gguf)))
    except ModelError as exc:
        return {"refused": str(exc)}
    info = source_metadata(where)
    wt = info.get("weight_types") or {}
    out: dict[str, Any] = {"restored": info.get("restored", [])}
    rep = check_model(gguf, model=model, weight_types=wt)
    out.update(loader=rep.max_diff, tokens=rep.tokens)
    ads = out["adapters"] = {}
    ad = ads["gguf"] = random_lora(model, work / name / "adapter-gguf", seed=1)
    rep = check_model(gguf, model=model, weight_types=wt, adapter=ad)
    out.update(export_gguf=rep.adapter_max_diff, effect=rep.adapter_effect)
    ad = ads["wrong_permutation"] = random_lora(model, work / name / "adapter-wrong-perm", seed=1,
                                                permute_qk=not fam.permuted)
    out["wrong_permutation"] = check_model(gguf, model=model, weight_types=wt, adapter=ad).adapter_max_diff
    dir_model, _tok, _ = load_model(ModelSource("dir", str(paths["hf"])))
    ad = ads["dir"] = random_lora(dir_model, work / name / "adapter-dir", seed=2)
    rep = check_model(gguf, model=dir_model, weight_types={}, adapter=ad)
    out.update(dir_loader=rep.max_diff, export_dir=rep.adapter_max_diff, effect_dir=rep.adapter_effect)
    return out
