"""The bundled SmolLM2 GGUF end to end: capture steers with the Session API, train a few
steps, export adapter.gguf, load it in llama.cpp and check it reproduces the PEFT model.

Exactness is checked like with like, so it holds on any CPU: llama.cpp runs an f32 GGUF
holding exactly the dequantized weights torch trains on, with an f32 KV cache. The Q4_1
model users steer is checked only for what quantisation cannot blur (direction, rank and
size of the adapter's effect): its Q4-vs-fp32 gap (~0.2 nats) depends on the CPU's kernels
(AMX, AVX-512 or AVX2 dot products round differently), so no exact bound can rest on it.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")
llama_cpp = pytest.importorskip("llama_cpp")



PROMPTS = ["Give four examples of fruit.", "Name three colors.", "Write one sentence about cats."]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, model_path):
    from steer_tui import Session
    from steer_tui.core.engine import open_engine

    root = tmp_path_factory.mktemp("e2e")
    # (STEER_CACHE: tests/conftest.py points it at this run's temp dir, never the user's cache)
    store = root / "store"
    eng = open_engine(model_path, n_ctx=512)
    try:
        for i, p in enumerate(PROMPTS):
            s = Session.create(store=store, prompt=p, model=eng, sampling={"temperature": 0, "seed": i})
            list(s.generate(max_tokens=12))
            s.rollback(4)
            s.correct(" Banana and kiwi")
            list(s.generate(max_tokens=8))
            s.rollback(len(s.response_tokens) - 3)
            s.correct(" really")
            list(s.generate(max_tokens=4))
            s.save()
            s.close()
    finally:
        eng.close() if hasattr(eng, "close") else None
    from train.cli import main

    out = root / "out"
    # Settings that move the adapter well away from the base on purpose (this test checks the
    # export, which needs a large delta), not steer-train's defaults, whose strong reference
    # KL keeps the delta below the Q4-vs-fp32 gap the check must exceed.
    rc = main(["--data", str(store / "tasks"), "--out", str(out), "--max-steps", "6", "--lr", "2e-3",
               "--objective", "sft+dpo", "--kl-weight", "0.1", "--kl-mode", "token",
               "--eval-fraction", "0.34", "--no-progress", "-q"])
    assert rc == 0
    return out


def _next_logprobs_hf(peft_model, ids):
    with torch.no_grad():
        ad = torch.log_softmax(peft_model(torch.tensor([ids])).logits[0, -1].double(), -1).numpy()
        with peft_model.disable_adapter():
            base = torch.log_softmax(peft_model(torch.tensor([ids])).logits[0, -1].double(), -1).numpy()
    return base, ad


def _next_logprobs_cpp(model_path, ids, lora=None):
    """Next-token log-probs from llama.cpp with an f32 KV cache (its default f16 cache would
    add its own rounding to a comparison with fp32 torch)."""
    from steer_tui.core.llama_load import load_llama

    kw = {"lora_path": str(lora)} if lora else {}
    f32 = int(llama_cpp.GGML_TYPE_F32)
    llm = load_llama(model_path, n_ctx=256, logits_all=True, verbose=False, type_k=f32, type_v=f32, **kw)
    llm.eval(ids)
    lg = np.array(llm.scores[len(ids) - 1], dtype=np.float64)
    llm.close()
    m = lg.max()
    return lg - m - np.log(np.exp(lg - m).sum())


@pytest.fixture(scope="module")
def f32_model(model_path, tmp_path_factory):
    """The bundled Q4_1 GGUF dequantized into an f32 GGUF: the weights transformers trains on
    (it dequantizes with the same gguf-py code), so llama.cpp and torch run one model."""
    from tests.train.gguf_f32 import dequantize_gguf

    return dequantize_gguf(model_path, tmp_path_factory.mktemp("f32") / "smollm2-f32.gguf")


def test_outputs_written(trained):
    m = json.loads((trained / "metrics.json").read_text())
    assert m["train"]["global_step"] == 6
    assert m["data"]["train_steers"] == 4 and m["data"]["eval_steers"] == 2
    assert m["eval"]["before"]["steers"] == 2
    assert m["eval"]["after"]["reward_margin"] > m["eval"]["before"]["reward_margin"]
    for f in ("adapter.gguf", "adapter_model.safetensors", "training.png", "Modelfile"):
        assert (trained / f).stat().st_size > 0
    from train.modelfile import parse_modelfile

    mf = parse_modelfile((trained / "Modelfile").read_text())
    assert mf["ADAPTER"] == [str((trained / "adapter.gguf").resolve())] and m["modelfile"] == str(trained / "Modelfile")


@pytest.fixture(scope="module")
def peft_and_ids(trained, model_path):
    from peft import PeftModel

    from train.modeling import load_model, resolve_model

    base_model, tok, _ = load_model(resolve_model(str(model_path)))
    peft_model = PeftModel.from_pretrained(base_model, str(trained)).eval()
    prompt = "<|im_start|>user\nGive four examples of fruit.<|im_end|>\n<|im_start|>assistant\n1."
    return peft_model, tok(prompt, add_special_tokens=False)["input_ids"]


# Like with like: llama.cpp runs the f32 GGUF, torch the same fp32 weights. Their base
# next-token log-probs then differ only by summation order (measured: ~1e-5 nats, both
# on AVX-512 with and without AMX); DELTA_TOL is the 0.05-nat export bar of issue 12, three
# orders of magnitude above that noise and well below a wrong export (measured: a missing
# q/k rotary permutation is off by >1 nat).
BASE_TOL = 1e-3
DELTA_TOL = 0.05


def test_adapter_gguf_matches_peft_in_llama_cpp(trained, peft_and_ids, f32_model):
    peft_model, ids = peft_and_ids
    hf_base, hf_ad = _next_logprobs_hf(peft_model, ids)
    cpp_base = _next_logprobs_cpp(f32_model, ids)
    cpp_ad = _next_logprobs_cpp(f32_model, ids, trained / "adapter.gguf")
    top = np.argsort(-hf_base)[:50]
    base_gap = np.abs(hf_base - cpp_base)[top].max()
    d_hf, d_cpp = (hf_ad - hf_base)[top], (cpp_ad - cpp_base)[top]
    err = np.abs(d_hf - d_cpp).max()
    print(f"f32: base_gap={base_gap:.2e} max|delta|={np.abs(d_hf).max():.3f} delta_err={err:.2e}")
    assert base_gap <= BASE_TOL  # one model in both runtimes
    assert np.abs(d_hf).max() >= 10 * DELTA_TOL, "adapter too weak to test the export"
    assert err <= DELTA_TOL


def test_qk_export_needs_the_rotary_permutation(peft_and_ids, f32_model, tmp_path):
    """Only the q/k LoRA kept (scaled up so it matters): the export must match there too, and
    forgetting convert_hf_to_gguf's row permutation must fail the same bound."""
    from train.export import export_lora_gguf

    peft_model, ids = peft_and_ids
    saved = {n: p.detach().clone() for n, p in peft_model.named_parameters() if "lora_B" in n}
    try:
        with torch.no_grad():
            for n, p in peft_model.named_parameters():
                if "lora_B" in n:
                    p.mul_(3.0) if ("q_proj" in n or "k_proj" in n) else p.zero_()
        qk_base, qk_ad = _next_logprobs_hf(peft_model, ids)
        cpp_base = _next_logprobs_cpp(f32_model, ids)
        top = np.argsort(-qk_base)[:50]
        d_qk = (qk_ad - qk_base)[top]
        assert np.abs(d_qk).max() >= 10 * DELTA_TOL
        errs = {}
        for permute in (True, False):
            g = export_lora_gguf(peft_model, tmp_path / f"qk-{permute}.gguf", permute_qk=permute)
            d = (_next_logprobs_cpp(f32_model, ids, g) - cpp_base)[top]
            errs[permute] = float(np.abs(d_qk - d).max())
        print(f"q/k only: delta_err with permutation {errs[True]:.2e}, without {errs[False]:.3f}")
        assert errs[True] <= DELTA_TOL
        assert errs[False] > 4 * DELTA_TOL
    finally:
        with torch.no_grad():
            for n, p in peft_model.named_parameters():
                if n in saved:
                    p.copy_(saved[n])


def test_adapter_effect_survives_q4_quantisation(trained, peft_and_ids, model_path):
    """On the Q4_1 model users actually steer, quantisation blurs values but not what the
    adapter does: the direction of its effect on the base's top tokens (correlation), which
    tokens it moves most (rank), and how far (size)."""
    peft_model, ids = peft_and_ids
    hf_base, hf_ad = _next_logprobs_hf(peft_model, ids)
    q4_base = _next_logprobs_cpp(model_path, ids)
    q4_ad = _next_logprobs_cpp(model_path, ids, trained / "adapter.gguf")
    top = np.argsort(-hf_base)[:50]
    d_hf, d_q4 = (hf_ad - hf_base)[top], (q4_ad - q4_base)[top]
    corr = float(np.corrcoef(d_hf, d_q4)[0, 1])
    size = float(np.linalg.norm(d_q4) / np.linalg.norm(d_hf))
    moved = set(np.argsort(-np.abs(d_hf))[:5]) & set(np.argsort(-np.abs(d_q4))[:10])
    print(f"Q4_1: corr={corr:.3f} size ratio={size:.2f} top-5 moved kept in top-10: {len(moved)}")
    assert corr >= 0.9
    assert 0.5 <= size <= 2.0
    assert len(moved) >= 4
