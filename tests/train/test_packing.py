"""token_logprobs: the linearized path against one unpadded forward per sequence."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from train.packing import token_logprobs  # noqa: E402


def tiny_llama(seed: int = 0, attn: str = "eager"):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        attn_implementation=attn,
    )
    return transformers.LlamaForCausalLM(cfg).eval()


def reference_logprobs(model, seq):
    logits = model(input_ids=torch.tensor([seq])).logits[0].float().log_softmax(-1)
    return logits[:-1].gather(-1, torch.tensor(seq[1:]).unsqueeze(-1)).squeeze(-1)


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


def test_linear_matches_one_forward_per_sequence(model):
    seqs = [[1, 2, 3, 4, 5], [1, 2, 3], [9, 8, 7, 6, 5, 4, 3, 2, 1], [5, 5]]
    with torch.no_grad():
        out = token_logprobs(model, seqs, packing="none", token_budget=12)
        for s, o in zip(seqs, out):
            assert o.shape == (len(s) - 1,)
            assert torch.allclose(o, reference_logprobs(model, s), atol=1e-5)


def test_length_one_sequence_gives_empty(model):
    out = token_logprobs(model, [[7], [1, 2]], packing="none")
    assert out[0].numel() == 0 and out[1].shape == (1,)


def test_bad_packing_name(model):
    with pytest.raises(ValueError, match="packing"):
        token_logprobs(model, [[1, 2]], packing="zip")
