"""The bundled SmolLM2 GGUF end to end: capture steers with the Session API, train a few
steps, export adapter.gguf, load it in llama.cpp and check it reproduces the PEFT model.

Tolerance: llama.cpp runs the Q4_1 weights, PEFT the dequantized fp32 weights, so even the
base models differ (measured first: ``base_gap`` = max |log p_hf - log p_cpp| over the base
model's top-50 next tokens, ~0.18 nats). The adapter's effect is compared as a *delta*
(adapted - base) in each runtime; it passes through the same quantized activations, so its
error is second order: we require ``max |delta_hf - delta_cpp| <= 2 * base_gap`` on those
tokens while the delta itself is large (``>= 4 * base_gap``), and correlation >= 0.98.
With only the q/k LoRA kept, an export without the rotary row permutation fails the same
bound (measured: error 1.5 nats vs 0.23 with it), so the check can fail.
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
    from steer_tui.core.llama_load import load_llama

    kw = {"lora_path": str(lora)} if lora else {}
    llm = load_llama(model_path, n_ctx=256, logits_all=True, verbose=False, **kw)
    llm.eval(ids)
    lg = np.array(llm.scores[len(ids) - 1], dtype=np.float64)
    m = lg.max()
    return lg - m - np.log(np.exp(lg - m).sum())


def test_outputs_written(trained):
    m = json.loads((trained / "metrics.json").read_text())
    assert m["train"]["global_step"] == 6
    assert m["data"]["train_steers"] == 4 and m["data"]["eval_steers"] == 2
    assert m["eval"]["before"]["steers"] == 2
    assert m["eval"]["after"]["reward_margin"] > m["eval"]["before"]["reward_margin"]
    for f in ("adapter.gguf", "adapter_model.safetensors", "training.png"):
        assert (trained / f).stat().st_size > 0


def test_adapter_gguf_matches_peft_in_llama_cpp(trained, model_path, tmp_path):
    from peft import PeftModel

    from train.export import export_lora_gguf
    from train.modeling import load_model, resolve_model

    base_model, tok, _ = load_model(resolve_model(str(model_path)))
    peft_model = PeftModel.from_pretrained(base_model, str(trained)).eval()
    prompt = "<|im_start|>user\nGive four examples of fruit.<|im_end|>\n<|im_start|>assistant\n1."
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    hf_base, hf_ad = _next_logprobs_hf(peft_model, ids)
    cpp_base = _next_logprobs_cpp(model_path, ids)
    cpp_ad = _next_logprobs_cpp(model_path, ids, trained / "adapter.gguf")
    top = np.argsort(-hf_base)[:50]
    base_gap = np.abs(hf_base - cpp_base)[top].max()
    d_hf, d_cpp = (hf_ad - hf_base)[top], (cpp_ad - cpp_base)[top]
    err = np.abs(d_hf - d_cpp).max()
    print(f"base_gap={base_gap:.3f} max|delta|={np.abs(d_hf).max():.3f} delta_err={err:.3f}")
    assert base_gap < 0.5  # same model, Q4_1 vs fp32
    assert np.abs(d_hf).max() >= 4 * base_gap, "adapter too weak to test the export"
    assert err <= 2 * base_gap
    assert np.corrcoef(d_hf, d_cpp)[0, 1] >= 0.98
    # q/k rotary permutation: keep only the q/k LoRA (scaled up so it matters); the export
    # must match there too, and forgetting convert_hf_to_gguf's permutation must not
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.mul_(3.0) if ("q_proj" in n or "k_proj" in n) else p.zero_()
    qk_base, qk_ad = _next_logprobs_hf(peft_model, ids)
    d_qk = (qk_ad - qk_base)[top]
    assert np.abs(d_qk).max() >= 4 * base_gap
    for permute, ok in ((True, True), (False, False)):
        g = export_lora_gguf(peft_model, tmp_path / f"qk-{permute}.gguf", permute_qk=permute)
        d = (_next_logprobs_cpp(model_path, ids, g) - cpp_base)[top]
        print(f"q/k only, permute={permute}: delta_err={np.abs(d_qk - d).max():.3f}")
        assert bool(np.abs(d_qk - d).max() <= 2 * base_gap) is ok
