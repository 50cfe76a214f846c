"""``steer-train convert`` and ``steer-train export-gguf``: the path for users who train with TRL
(or any other trainer) on the model llama.cpp runs and bring the adapter back to steer-tui.

On tiny random GGUFs written by llama.cpp's own converter (tests/train/families.py; the
session fixture fails, never skips, when the converter cannot be fetched):

* ``convert`` writes a directory that plain ``AutoModelForCausalLM.from_pretrained`` loads
  with exactly the training loader's next-token log-probs, which match llama.cpp's; its
  tokenizer tokenizes as llama.cpp does and carries the GGUF's chat template; files are
  hard-linked from the cache (copied across filesystems); the refusals exit 2 naming the
  file or argument;
* the TRL-style round trip: ``get_peft_model`` on the converted model (LoRA on q/k/v/o, random
  nonzero B), ``save_pretrained``, ``export-gguf``, then llama.cpp with the adapter moves the
  next-token log-probs as the PEFT model does (f32 GGUF: equal up to summation order, within
  ``train.check.THRESHOLD``, while the adapter's effect is nats); the refusals of
  ``export-gguf``.
"""

from __future__ import annotations

import errno
import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")
pytest.importorskip("llama_cpp")

from tests.train.families import ConverterUnavailable, build, converter_root  # noqa: E402
from train.check import (THRESHOLD, TEXT, check_text, hf_logprobs, llama_logprobs, next_token_diff,  # noqa: E402
                         next_token_lp)
from train.cli import main  # noqa: E402
from train.modeling import SOURCE_FILE, load_model, resolve_model  # noqa: E402


@pytest.fixture(scope="module")
def ggufs(tmp_path_factory):
    """{"llama": f32 GGUF, "mixtral": f32 GGUF (refused: MoE)}, converted once."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        conv = converter_root()
    except ConverterUnavailable as exc:
        pytest.fail(f"llama.cpp's converter is needed and could not be obtained: {exc}", pytrace=False)
    built = build(tmp_path_factory.mktemp("families"), ["llama", "mixtral"], converter=conv)
    return {name: paths["gguf"] for name, paths in built.items()}


@pytest.fixture(scope="module")
def converted(ggufs, tmp_path_factory):
    out = tmp_path_factory.mktemp("convert") / "tiny-llama-hf"
    assert main(["convert", str(ggufs["llama"]), "--out", str(out)]) == 0
    return out


def _err(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err  # one line
    return err


# ---------------------------------------------------------------------------- convert


def test_convert_loads_with_plain_from_pretrained_as_the_training_loader(ggufs, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from steer_tui.core.gguf import gguf_metadata
    from train.modeling import converted_dir

    gguf, out = ggufs["llama"], tmp_path / "hf"
    assert main(["convert", str(gguf), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "hard-linked" in printed and f"from_pretrained({str(out)!r})" in printed
    source = resolve_model(str(gguf))
    cache = converted_dir(source)
    for f in cache.iterdir():  # every file of the conversion, the same inode
        assert os.stat(out / f.name).st_ino == os.stat(f).st_ino, f.name
    assert json.loads((out / SOURCE_FILE).read_text())["gguf_path"] == str(gguf.resolve())

    model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    ref, _tok, _ = load_model(source)
    tokens = check_text(gguf)
    lp = hf_logprobs(model, tokens)
    assert np.array_equal(lp, hf_logprobs(ref, tokens))  # the same weights and config: exactly
    assert next_token_diff(llama_logprobs(gguf, tokens), lp, tokens).max() <= THRESHOLD

    tok = AutoTokenizer.from_pretrained(str(out))
    ids = tok(TEXT, add_special_tokens=False).input_ids
    assert tokens[-len(ids):] == ids and len(tokens) - len(ids) <= 1  # as llama.cpp (+ its BOS)
    template = gguf_metadata(gguf, ("tokenizer.chat_template",))["tokenizer.chat_template"]
    assert template and tok.chat_template == template
    rendered = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert "Hi" in rendered


def test_convert_copies_across_filesystems(ggufs, tmp_path, capsys, monkeypatch):
    def no_link(src, dst):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", no_link)
    out = tmp_path / "hf"
    assert main(["convert", str(ggufs["llama"]), "--out", str(out)]) == 0
    assert "files copied (another filesystem)" in capsys.readouterr().out
    assert (out / "config.json").is_file() and (out / SOURCE_FILE).is_file() and list(out.glob("*.safetensors"))


def test_convert_refusals(ggufs, tmp_path, capsys):
    out = tmp_path / "hf"
    assert main(["convert", str(tmp_path / "missing.gguf"), "--out", str(out)]) == 2
    assert "missing.gguf' is not a file" in _err(capsys)
    text = tmp_path / "notes.gguf"
    text.write_text("not a model")
    assert main(["convert", str(text), "--out", str(out)]) == 2
    assert "notes.gguf' is not a GGUF file" in _err(capsys)
    assert main(["convert", str(ggufs["mixtral"]), "--out", str(out)]) == 2
    assert "mixture-of-experts" in _err(capsys)
    assert not out.exists()

    out.mkdir()
    (out / "keep.txt").write_text("mine")
    (out / "model-00009-of-00009.safetensors").write_bytes(b"stale")
    assert main(["convert", str(ggufs["llama"]), "--out", str(out)]) == 2
    assert "hf' exists and is not empty (pass --force" in _err(capsys)
    assert main(["convert", str(ggufs["llama"]), "--out", str(out), "--force"]) == 0
    assert (out / "keep.txt").read_text() == "mine"  # not ours: left alone
    assert not (out / "model-00009-of-00009.safetensors").exists()  # a stale shard would be loaded too
    assert (out / "config.json").is_file()
    assert main(["convert", str(ggufs["llama"]), "--out", str(out / "keep.txt")]) == 2
    assert "keep.txt' exists and is not a directory" in _err(capsys)


# ---------------------------------------------------------------------------- export-gguf


def _peft(model_dir, peft_dir, targets, *, std=0.05, seed=0):
    """What a TRL run leaves: a PEFT LoRA on the converted model, saved with save_pretrained."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    pm = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    pm.save_pretrained(str(peft_dir))
    return pm


def test_trl_round_trip_does_in_llama_cpp_what_it_does_in_peft(ggufs, converted, tmp_path, capsys):
    from train.modelfile import parse_modelfile

    gguf, peft_dir = ggufs["llama"], tmp_path / "trl-out"
    pm = _peft(converted, peft_dir, ["q_proj", "k_proj", "v_proj", "o_proj"])
    assert json.loads((peft_dir / "adapter_config.json").read_text())["base_model_name_or_path"] == str(converted)
    capsys.readouterr()
    assert main(["export-gguf", str(peft_dir)]) == 0
    printed = capsys.readouterr().out
    adapter = peft_dir / "adapter.gguf"
    assert f"steer-tui session --model {gguf.resolve()} --adapter {adapter}" in printed
    mf = parse_modelfile((peft_dir / "Modelfile").read_text())
    assert mf["FROM"] == [str(gguf.resolve())] and mf["ADAPTER"] == [str(adapter.resolve())]

    tokens = check_text(gguf)
    lp_peft = hf_logprobs(pm, tokens)
    with pm.disable_adapter():
        lp_base = hf_logprobs(pm, tokens)
    delta_peft = next_token_lp(lp_peft, tokens) - next_token_lp(lp_base, tokens)
    delta_cpp = (next_token_lp(llama_logprobs(gguf, tokens, adapter=str(adapter)), tokens)
                 - next_token_lp(llama_logprobs(gguf, tokens), tokens))
    effect, diff = float(np.abs(delta_cpp).max()), float(np.abs(delta_cpp - delta_peft).max())
    print(f"adapter effect {effect:.3f} nats, llama.cpp vs PEFT {diff:.2e}")
    assert effect > 10 * THRESHOLD  # the adapter does something the comparison can see
    assert diff <= THRESHOLD

    # the GGUF the directory came from has changed: no Modelfile, no GGUF named
    moved = tmp_path / "moved"
    info = json.loads((converted / SOURCE_FILE).read_text())
    try:
        (converted / SOURCE_FILE).unlink()  # a hard link: write a new file, leave the cache's
        (converted / SOURCE_FILE).write_text(json.dumps({**info, "gguf_sha256": "0" * 64}))
        assert main(["export-gguf", str(peft_dir), "--out", str(moved / "a.gguf")]) == 0
        assert "--model BASE.gguf --adapter" in capsys.readouterr().out
        assert (moved / "a.gguf").is_file() and not (moved / "Modelfile").exists()
    finally:
        (converted / SOURCE_FILE).write_text(json.dumps(info, indent=2))

    # --out elsewhere, base given as the GGUF itself (the same conversion)
    other = tmp_path / "elsewhere" / "a.gguf"
    assert main(["export-gguf", str(peft_dir), "--model", str(gguf), "--out", str(other)]) == 0
    assert other.is_file() and (other.parent / "Modelfile").is_file()


def test_export_gguf_refusals(converted, tmp_path, capsys):
    assert main(["export-gguf", str(tmp_path / "nope")]) == 2
    assert "nope' is not a directory" in _err(capsys)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["export-gguf", str(empty)]) == 2
    assert "empty' has no adapter_config.json" in _err(capsys)

    peft_dir = tmp_path / "emb"
    _peft(converted, peft_dir, ["q_proj", "embed_tokens"])
    capsys.readouterr()
    assert main(["export-gguf", str(peft_dir)]) == 2
    assert "LoRA on the embedding 'model.embed_tokens' is not supported" in _err(capsys)
    assert not (peft_dir / "adapter.gguf").exists()

    cfg = json.loads((peft_dir / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(tmp_path / "gone")
    (peft_dir / "adapter_config.json").write_text(json.dumps(cfg))
    assert main(["export-gguf", str(peft_dir)]) == 2
    assert "gone' (from adapter_config.json)" in _err(capsys)
    assert main(["export-gguf", str(peft_dir), "--model", str(tmp_path / "gone2")]) == 2
    assert "gone2' (from --model)" in _err(capsys)
