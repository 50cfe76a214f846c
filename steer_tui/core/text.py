"""Incremental, UTF-8-safe detokenization.

Byte-level tokenizers split multi-byte characters across tokens ("é" can be two tokens).
Decoding each token on its own would show replacement characters. ``TextDecoder`` feeds the
bytes of one token at a time to an incremental UTF-8 decoder, which holds back an
incomplete character until the token that completes it arrives: the piece of the first
token is ``""`` and the piece of the second is ``"é"``. The pieces therefore always
concatenate to the decoded text of all bytes seen so far, minus an incomplete character at
the very end (``flush`` turns that into U+FFFD). Bytes that can never be valid UTF-8 become
U+FFFD at once, so a piece is never broken UTF-8.
"""

from __future__ import annotations

import codecs
from collections.abc import Callable, Iterable

__all__ = ["TextDecoder", "pieces"]


class TextDecoder:
    """Feed token bytes, get text pieces. To continue after a known prefix (e.g. the end of
    a parent node), feed the prefix's bytes first (``token_view.decoder_at`` does that)."""

    def __init__(self) -> None:
        self._dec = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, data: bytes) -> str:
        """The text completed by ``data`` (an incomplete trailing character is held back)."""
        return self._dec.decode(data, final=False)

    def pending(self) -> bytes:
        """Bytes of an incomplete character held back so far."""
        return self._dec.getstate()[0]

    def flush(self) -> str:
        """End of input: an incomplete character held back becomes U+FFFD."""
        return self._dec.decode(b"", final=True)


def pieces(token_bytes: Callable[[int], bytes], tokens: Iterable[int], decoder: TextDecoder | None = None) -> list[str]:
    """Text piece of each token, continuing ``decoder`` (which is advanced) if given."""
    dec = decoder if decoder is not None else TextDecoder()
    return [dec.feed(token_bytes(t)) for t in tokens]
