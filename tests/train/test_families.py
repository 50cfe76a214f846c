"""Every model family steer-train accepts computes in training what llama.cpp computes from its
GGUF, or is refused by name (issue 12).

Tiny random models of each family (tests/train/families.py: hidden 64, 2 layers, the bundled
model's tokenizer, the family's feature that needs restoring) are converted to f32 GGUFs by
llama.cpp's own ``convert_hf_to_gguf.py`` (from the llama-cpp-python sdist; a session fixture
fetches it once and fails, never skips, when it cannot). Per family:

* the training loader on the GGUF matches llama.cpp (<= 0.05 nats, next-token log-probs at
  every position of the check text), and breaking what the loader restored (a mutation of
  the converted config) makes it fail: the check is sensitive to each restored feature;
* a random nonzero PEFT LoRA exported to adapter.gguf does in llama.cpp what it does in PEFT
  (<= 0.05 nats on the adapter's effect), trained on the GGUF-loaded model and on the HF
  directory; inverting the q/k row permutation fails the same check;
* tree packing equals linear packing on the converted model;
* ``steer-train check-model`` exits 0 / 1 / 2 and the pre-training check refuses a mismatch;
* the chat template in each GGUF renders (the rendered prompts are printed);
* the MoE family (mixtral) is refused by name, never loaded with random experts.
"""

from __future__ import annotations

import json
import random
import shutil

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")
pytest.importorskip("llama_cpp")

from tests.train.families import FAMILIES, ConverterUnavailable, build, converter_root, measure  # noqa: E402
from train.check import THRESHOLD  # noqa: E402

SUPPORTED = [n for n, f in FAMILIES.items() if f.refused is None]
REFUSED = [n for n, f in FAMILIES.items() if f.refused is not None]


@pytest.fixture(scope="session")
def converter():
    try:
        return converter_root()
    except ConverterUnavailable as exc:
        pytest.fail(f"llama.cpp's converter is needed for the family tests and could not be obtained: {exc}",
                    pytrace=False)


@pytest.fixture(scope="module")
def fams(tmp_path_factory, converter):
    """{family: {"hf": dir, "gguf": f32 GGUF}} for every family, built and converted once."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    return build(tmp_path_factory.mktemp("families"), converter=converter)


@pytest.fixture(scope="module")
def measured(fams, tmp_path_factory):
    """bench/families.py's measurements, computed once per family on first use."""
    work = tmp_path_factory.mktemp("adapters")
    cache: dict[str, dict] = {}

    def get(name: str) -> dict:
        if name not in cache:
            cache[name] = measure(name, fams[name], work)
            print(f"{name}: {json.dumps(cache[name], default=str)}")
        return cache[name]

    return get


# ---------------------------------------------------------------------------- loader


@pytest.mark.parametrize("name", SUPPORTED)
def test_loader_matches_llama_cpp(name, measured):
    r = measured(name)
    assert "refused" not in r, r.get("refused")
    assert r["loader"] <= THRESHOLD, f"{name}: training model vs llama.cpp {r['loader']:.4f} nats"
    assert r["dir_loader"] <= THRESHOLD  # the HF directory it was converted from computes the same


EXPECTED_RESTORED = {
    "llama3": "rope_freqs",
    "gemma2": "query_pre_attn_scalar 16",
    "gemma3": "local rope base 10000",
    "phi3": "partial rotary 8/16",
}


@pytest.mark.parametrize("name", sorted(EXPECTED_RESTORED))
def test_restored_features_are_reported(name, measured):
    assert any(EXPECTED_RESTORED[name] in note for note in measured(name)["restored"])


def _mutate(cfg: dict, name: str, what: str) -> None:
    if what == "rope":  # the stock transformers GGUF loader's llama3 / global-layer / LongRoPE loss
        rp = cfg["rope_parameters"]
        target = rp["full_attention"] if "full_attention" in rp else rp
        for k in list(target):
            if k not in ("rope_theta", "partial_rotary_factor"):
                del target[k]
        target["rope_type"] = "default"
    elif what == "scalar":  # transformers' default query_pre_attn_scalar
        cfg["query_pre_attn_scalar"] = 256
    elif what == "softcap":
        cfg["attn_logit_softcapping"] = None
    elif what == "final_softcap":
        cfg["final_logit_softcapping"] = None
    elif what == "window":
        cfg["sliding_window"] = 4096
    elif what == "partial_rotary":
        cfg["rope_parameters"]["partial_rotary_factor"] = 1.0
        for k in ("short_factor", "long_factor"):  # one factor per rotated pair
            cfg["rope_parameters"][k] = cfg["rope_parameters"][k] * 2


MUTATIONS = [("llama3", "rope"), ("gemma2", "scalar"), ("gemma2", "softcap"), ("gemma2", "final_softcap"),
             ("gemma2", "window"),
             ("gemma3", "scalar"), ("gemma3", "rope"), ("gemma3", "window"), ("phi3", "rope"),
             ("phi3", "partial_rotary")]


@pytest.mark.parametrize("name,what", MUTATIONS)
def test_check_fails_when_a_restored_feature_is_dropped(name, what, fams, tmp_path):
    """The check is sensitive: the converted model with one restored feature undone (what the
    stock transformers loader produces) no longer matches llama.cpp."""
    from transformers import AutoModelForCausalLM

    from train.check import check_model
    from train.modeling import load_model, resolve_model

    _, _, where = load_model(resolve_model(str(fams[name]["gguf"])))
    broken = tmp_path / "broken"
    shutil.copytree(where, broken)
    cfg = json.loads((broken / "config.json").read_text())
    _mutate(cfg, name, what)
    (broken / "config.json").write_text(json.dumps(cfg))
    model = AutoModelForCausalLM.from_pretrained(broken, dtype=torch.float32)
    rep = check_model(fams[name]["gguf"], model=model, weight_types={})
    print(f"{name} without {what}: {rep.max_diff:.3f} nats")
    assert not rep.ok and rep.max_diff > 10 * THRESHOLD


@pytest.mark.parametrize("name", REFUSED)
def test_moe_is_refused_by_name(name, fams):
    from train.modeling import ModelError, load_model, resolve_model

    with pytest.raises(ModelError, match=r"llama \(Mixtral-style\): mixture-of-experts models \(4 experts\)"):
        load_model(resolve_model(str(fams[name]["gguf"])))


def test_missing_weights_are_an_error(tmp_path):
    """A checkpoint that leaves a weight to its random initialisation is refused."""
    from tests.train.tiny import tiny_llama
    from train.modeling import ModelError, ModelSource, load_model

    m = tiny_llama()
    m.save_pretrained(tmp_path, safe_serialization=True)
    from safetensors.torch import load_file, save_file

    sd = load_file(tmp_path / "model.safetensors")
    del sd["model.layers.1.mlp.down_proj.weight"]
    save_file(sd, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelError, match="down_proj.weight.*randomly initialised|randomly initialised.*down_proj"):
        load_model(ModelSource("dir", str(tmp_path)))


# ---------------------------------------------------------------------------- export


@pytest.mark.parametrize("name", SUPPORTED)
def test_export_reproduces_the_peft_adapter(name, measured):
    r = measured(name)
    assert r["effect"] > 0.2 and r["effect_dir"] > 0.2, "the random adapter must change the model"
    assert r["export_gguf"] <= THRESHOLD, f"adapter.gguf from a GGUF-loaded model: {r['export_gguf']:.4f}"
    assert r["export_dir"] <= THRESHOLD, f"adapter.gguf from the HF directory: {r['export_dir']:.4f}"


@pytest.mark.parametrize("name", SUPPORTED)
def test_wrong_qk_permutation_fails_the_same_check(name, measured):
    r = measured(name)
    assert r["wrong_permutation"] > 4 * THRESHOLD, f"{name}: a wrong q/k permutation went unnoticed"


def test_export_architecture_names():
    from train.export import _PERMUTE_QK, gguf_arch

    assert gguf_arch("mistral") == "llama" and gguf_arch("gemma3_text") == "gemma3" and gguf_arch("qwen2") == "qwen2"
    assert {"llama", "mistral3", "smollm3", "arcee"} <= _PERMUTE_QK
    assert not {"qwen2", "qwen3", "gemma2", "gemma3", "phi3"} & _PERMUTE_QK


# ---------------------------------------------------------------------------- packing


@pytest.mark.parametrize("name", SUPPORTED)
def test_tree_packing_equals_linear(name, fams):
    from train.modeling import load_model, resolve_model
    from train.logprobs import token_logprobs

    model, _, _ = load_model(resolve_model(str(fams[name]["gguf"])))
    model.eval()
    rng = random.Random(0)
    # steer-like sequences sharing prefixes; short enough for the 8-token sliding windows
    prefix = [rng.randrange(100, 40000) for _ in range(4)]
    seqs = [prefix + [rng.randrange(100, 40000) for _ in range(rng.randint(1, 3))] for _ in range(6)] + [prefix]
    # rows no longer than a sliding window (8 here; tree packing refuses longer rows there)
    budget = getattr(model.config, "sliding_window", None) or 64
    with torch.no_grad():
        tree = token_logprobs(model, seqs, packing="tree", token_budget=budget)
        lin = token_logprobs(model, seqs, packing="none", token_budget=budget)
    assert max(float((a - b).abs().max()) for a, b in zip(tree, lin) if len(a)) <= 1e-4


# ---------------------------------------------------------------------------- check-model


def test_check_model_cli_exit_codes(fams, measured, tmp_path, capsys):
    from train.cli import main

    name = "qwen2"
    gguf = fams[name]["gguf"]
    assert main(["check-model", str(gguf)]) == 0
    out = capsys.readouterr().out
    assert "verdict    MATCH" in out and "qwen2, F32" in out
    ad = measured(name)["adapters"]["gguf"]
    assert main(["check-model", str(gguf), "--adapter", str(ad / "adapter.gguf"), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["ok"] and rep["adapter_max_diff"] <= THRESHOLD
    wrong = measured(name)["adapters"]["wrong_permutation"]
    assert main(["check-model", str(gguf), "--adapter", str(wrong)]) == 1
    assert "verdict    MISMATCH" in capsys.readouterr().out
    assert main(["check-model", str(fams["mixtral"]["gguf"])]) == 2
    assert "mixture-of-experts" in capsys.readouterr().err
    assert main(["check-model", str(tmp_path / "nope.gguf")]) == 2


def test_pretraining_check_refuses_a_mismatch(fams, tmp_path, caplog):
    """What ``steer-train`` runs before training: a model that does not match llama.cpp is
    refused (ModelMismatch) unless --allow-model-mismatch."""
    from transformers import AutoModelForCausalLM

    from train.check import ModelMismatch, pretraining_check
    from train.modeling import load_model, resolve_model, source_metadata

    gguf = fams["llama3"]["gguf"]
    model, _, where = load_model(resolve_model(str(gguf)))
    assert pretraining_check(model, gguf, source_metadata(where)).ok
    broken = tmp_path / "broken"
    shutil.copytree(where, broken)
    cfg = json.loads((broken / "config.json").read_text())
    _mutate(cfg, "llama3", "rope")
    (broken / "config.json").write_text(json.dumps(cfg))
    bad = AutoModelForCausalLM.from_pretrained(broken, dtype=torch.float32)
    with pytest.raises(ModelMismatch, match="does not compute what llama.cpp computes.*--allow-model-mismatch"):
        pretraining_check(bad, gguf, source_metadata(where))
    assert not pretraining_check(bad, gguf, source_metadata(where), allow_mismatch=True).ok


def test_steer_train_runs_the_check_and_refuses(fams, tmp_path, monkeypatch, capsys):
    """End to end through the CLI: exit 4 on a mismatch, training with --allow-model-mismatch."""
    import train.check as C
    from tests.train.tiny import write_trees
    from train.cli import main

    gguf = fams["qwen2"]["gguf"]
    data = write_trees(tmp_path / "trees", n_tasks=2, n_steers=1)
    from steer_tui.core.store import file_sha256

    sha = file_sha256(gguf)
    for f in data.glob("*.json"):  # trees captured with this GGUF (tiny.py's tokens are valid ids here)
        t = json.loads(f.read_text())
        t["model"].update(path=str(gguf), sha256=sha, n_vocab=49152)
        f.write_text(json.dumps(t))
    real = C.check_model

    def off_by_one(*a, **k):
        rep = real(*a, **k)
        rep.max_diff += 1.0  # as if the loader had dropped a feature
        return rep

    monkeypatch.setattr(C, "check_model", off_by_one)
    args = ["--data", str(data), "--model", str(gguf), "--max-steps", "1", "--no-progress", "-q", "--no-gguf",
            "--eval-fraction", "0"]
    assert main(args + ["--out", str(tmp_path / "out1")]) == 4
    assert "does not compute what llama.cpp computes" in capsys.readouterr().err
    assert main(args + ["--out", str(tmp_path / "out2"), "--allow-model-mismatch"]) == 0
    m = json.loads((tmp_path / "out2" / "metrics.json").read_text())
    assert m["model"]["check"]["ok"] is False


# ---------------------------------------------------------------------------- chat templates


TEMPLATE_MARKS = {
    "llama": ["<|start_header_id|>user<|end_header_id|>", "<|start_header_id|>assistant<|end_header_id|>\n\n"],
    "llama3": ["<|start_header_id|>user<|end_header_id|>", "<|start_header_id|>assistant<|end_header_id|>\n\n"],
    "mistral": ["[INST]", "[/INST]"],
    "qwen2": ["<|im_start|>user\nName three colors.<|im_end|>", "<|im_start|>assistant\n"],
    "qwen3": ["<|im_start|>user\nName three colors.<|im_end|>", "<|im_start|>assistant\n"],
    "gemma2": ["<start_of_turn>user\n", "<start_of_turn>model\n"],
    "gemma3": ["<start_of_turn>user\n", "<start_of_turn>model\n"],
    "phi3": ["<|user|>", "<|assistant|>"],
}


@pytest.mark.parametrize("name", SUPPORTED)
def test_chat_template_renders_the_familys_own_prompt(name, fams):
    """The engine renders each family's own template from its GGUF (what the app and ``auto``
    use); the rendered prompt is printed for the record."""
    from steer_tui.core.llama_engine import LlamaEngine

    eng = LlamaEngine(fams[name]["gguf"], n_ctx=256, n_gpu_layers=0)
    try:
        text = eng.render_chat([{"role": "user", "content": "Name three colors."}])
    finally:
        eng.close()
    print(f"--- {name}\n{text}\n---")
    pos = [text.find(m) for m in TEMPLATE_MARKS[name]]
    assert all(p >= 0 for p in pos) and pos == sorted(pos), (name, text)
    assert "Name three colors." in text


def test_llama3_parameters_recovered_from_rope_freqs():
    """Llama-3.1's rope_freqs (factor 8, low 1, high 4, original 8192) become llama3 rope
    parameters; factors no standard set reproduces become an exactly equivalent LongRoPE."""
    import math

    import numpy as np

    from train.gguf_config import _llama3_or_longrope

    base, n_rot = 500000.0, 128
    inv = base ** (-np.arange(0, n_rot, 2) / n_rot)
    wl = 2 * math.pi / inv
    smooth = (8192 / wl - 1) / 3
    ff = np.where(wl < 2048, 1.0, np.where(wl > 8192, 8.0, 1 / ((1 - smooth) / 8 + smooth))).astype(np.float32)
    p = _llama3_or_longrope(ff.astype(np.float64), base=base, n_rot=n_rot, ctx=131072)
    assert p == {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                 "original_max_position_embeddings": 8192}
    odd = ff.astype(np.float64) * 1.01
    q = _llama3_or_longrope(odd, base=base, n_rot=n_rot, ctx=131072)
    assert q["rope_type"] == "longrope" and q["short_factor"] == q["long_factor"] == odd.tolist()
    assert q["attention_factor"] == 1.0
