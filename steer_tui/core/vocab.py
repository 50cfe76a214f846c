"""The vocabulary hash: one fingerprint of what a model's token ids mean.

The engine writes it into every tree (``model.vocab_sha256``) and the trainer compares it with
its own tokenizer's: equal hashes mean the tree's token ids can be trained on as they are;
a difference means they must be retokenised. Both sides call :func:`vocab_sha256`, so the rule
cannot drift apart.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

__all__ = ["vocab_sha256"]


def vocab_sha256(pieces: Iterable[bytes]) -> str:
    """sha256 over every token's bytes in id order, each prefixed with its length (4 bytes,
    little endian, so that concatenations cannot collide). Two models with equal values give
    token ids the same meaning."""
    h = hashlib.sha256()
    for p in pieces:
        h.update(len(p).to_bytes(4, "little"))
        h.update(p)
    return h.hexdigest()
