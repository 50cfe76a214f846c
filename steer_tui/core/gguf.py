"""Reading GGUF files without llama.cpp: the magic check and the header's metadata.

Every place that asks "is this a GGUF file?" (the model check, this header reader, the
training side's model resolver and converter) calls :func:`is_gguf_magic`.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Sequence
from typing import Any

from steer_tui.core.errors import EngineError

__all__ = ["GGUF_MAGIC", "gguf_metadata", "is_gguf_magic"]

#: The first four bytes of every GGUF file.
GGUF_MAGIC = b"GGUF"

#: struct formats of GGUF's scalar value types (by type code); 8 is a string, 9 an array.
_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_GGUF_STRING, _GGUF_ARRAY = 8, 9
#: A metadata string longer than this means a corrupt header, not a real value.
_MAX_STRING_BYTES = 1 << 24


def is_gguf_magic(head: bytes) -> bool:
    """True if ``head`` (the first bytes of a file; at least four) starts with the GGUF magic."""
    return bytes(head[:4]) == GGUF_MAGIC


def gguf_metadata(path: str | os.PathLike[str], keys: Sequence[str], *, max_kv: int = 4096) -> dict[str, Any]:
    """Read the given scalar/string metadata keys from a GGUF header (pure Python, stops as
    soon as all are found). Raises EngineError for a truncated or malformed header."""
    want = set(keys)
    found: dict[str, Any] = {}
    try:
        with open(path, "rb") as fh:

            def read(fmt: str) -> Any:
                size = struct.calcsize(fmt)
                data = fh.read(size)
                if len(data) != size:
                    raise EOFError
                return struct.unpack(fmt, data)[0]

            def read_str() -> bytes:
                n = read("<Q")
                if n > _MAX_STRING_BYTES:
                    raise ValueError("string too long")
                data = fh.read(n)
                if len(data) != n:
                    raise EOFError
                return data

            def skip(vtype: int) -> None:
                if vtype in _GGUF_SCALARS:
                    fh.seek(struct.calcsize(_GGUF_SCALARS[vtype]), 1)
                elif vtype == _GGUF_STRING:
                    fh.seek(read("<Q"), 1)
                elif vtype == _GGUF_ARRAY:
                    etype, count = read("<I"), read("<Q")
                    if etype in _GGUF_SCALARS:
                        fh.seek(struct.calcsize(_GGUF_SCALARS[etype]) * count, 1)
                    else:
                        for _ in range(count):
                            skip(etype)
                else:
                    raise ValueError(f"unknown value type {vtype}")

            if not is_gguf_magic(fh.read(4)):
                raise ValueError("bad magic")
            version = read("<I")
            if version < 2:
                raise ValueError(f"unsupported GGUF version {version}")
            read("<Q")  # tensor count
            n_kv = read("<Q")
            for _ in range(min(n_kv, max_kv)):
                key = read_str().decode("utf-8", "replace")
                vtype = read("<I")
                if key in want and vtype in _GGUF_SCALARS:
                    found[key] = read(_GGUF_SCALARS[vtype])
                elif key in want and vtype == _GGUF_STRING:
                    found[key] = read_str().decode("utf-8", "replace")
                else:
                    skip(vtype)
                if len(found) == len(want):
                    break
    except (EOFError, ValueError, OSError) as exc:
        raise EngineError(f"{str(path)!r}: unreadable GGUF header ({exc or 'file is truncated'})") from None
    return found
