"""A tiny random Llama and synthetic steer trees over its 128-token vocabulary (test helpers)."""

from __future__ import annotations

import random

from steer_tui.core.store import save_tree
from steer_tui.core.tree import Node, new_tree

VOCAB = 128


def tiny_llama(seed: int = 0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True, attn_implementation="eager")
    return LlamaForCausalLM(cfg).eval()


def synthetic_tree(task_id: str, seed: int, n_steers: int = 3):
    """prompt, then model text with `n_steers` corrections: the model wrote tokens in 60..79,
    the human always replaces them with tokens in 100..103 (a learnable preference)."""
    rng = random.Random(seed)
    t = new_tree(task_id=task_id, title=task_id,
                 model={"name": "tiny", "path": "", "sha256": "tiny", "n_vocab": VOCAB, "vocab_sha256": "tiny",
                        "eos_ids": [0]},
                 prompt={"mode": "raw", "text": "", "tokens": [1] + [rng.randrange(2, 40) for _ in range(6)]},
                 sampling={})
    parent = None
    for _ in range(n_steers):
        m = t.add(Node(t.new_id(), parent, "model", "generated", [rng.randrange(40, 60) for _ in range(4)], "m", end="cut"))
        bad = t.add(Node(t.new_id(), m.id, "model", "generated", [rng.randrange(60, 80) for _ in range(3)], "b",
                         end="paused"))
        h = t.add(Node(t.new_id(), m.id, "human", "correction", [100 + rng.randrange(4) for _ in range(3)], "h",
                       replaces=bad.id))
        parent = h.id
    t.add(Node(t.new_id(), parent, "model", "generated", [rng.randrange(40, 60) for _ in range(4)] + [0], "e", end="eos"))
    return t


def write_trees(root, n_tasks: int = 6, n_steers: int = 3):
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n_tasks):
        save_tree(synthetic_tree(f"task{i}", seed=i, n_steers=n_steers), root / f"task{i}.json")
    return root


def save_tiny_model(path) -> str:
    tiny_llama().save_pretrained(path, safe_serialization=True)
    return str(path)
