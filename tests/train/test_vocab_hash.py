"""The vocabulary hash is one rule (``steer_tui.core.vocab.vocab_sha256``): the engine writes
it into every tree and the trainer computes it from its tokenizer; on the bundled model they
must agree, or training would silently retokenise every tree."""

from __future__ import annotations

import pytest

from steer_tui.core.vocab import vocab_sha256

pytest.importorskip("transformers")


def test_engine_and_training_tokenizer_hash_the_vocabulary_alike(model_path):
    from transformers import AutoTokenizer

    from steer_tui.core.engine import open_engine
    from train.modeling import tokenizer_vocab_sha256

    engine = open_engine(model_path, n_ctx=64)
    try:
        engine_hash = engine.vocab_sha256
        assert engine_hash == vocab_sha256(engine.all_token_bytes())
    finally:
        engine.close()
    tokenizer = AutoTokenizer.from_pretrained(str(model_path.parent), gguf_file=model_path.name)
    assert tokenizer_vocab_sha256(tokenizer) == engine_hash


def test_vocab_hash_is_length_prefixed():
    assert vocab_sha256([b"ab", b"c"]) != vocab_sha256([b"a", b"bc"])
    assert vocab_sha256([]) == vocab_sha256(iter([]))
