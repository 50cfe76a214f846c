"""Read a GGUF file: its metadata and tensor directory, tensor bytes lazily from a memory map.

This is the bottom of steer-train's GGUF loader, which turns a GGUF into the Hugging Face
model that computes what llama.cpp computes from it: `train.gguf_config` rebuilds the
config, `train.gguf_weights` turns the tensors into the model's weights, and
`train.modeling.convert_gguf` caches the result.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from steer_tui.core.gguf import is_gguf_magic

#: bump when the conversion changes: cached conversions of an older loader are redone
LOADER_VERSION = 2


class Unsupported(Exception):
    """This GGUF cannot be trained faithfully; ``str()`` is one line naming why."""


# ---------------------------------------------------------------------------- metadata


_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_BIG_ARRAY = 4096  # longer arrays (token lists, merges) are skipped, their bytes only hashed


class Tensor:
    """One tensor of a GGUF: ``name``, ``shape`` (ggml order, ``ne0`` first), ``tensor_type``
    (gguf.GGMLQuantizationType) and its raw bytes, rows last (``raw``)."""

    def __init__(self, meta: "Meta", name: str, ne: list[int], ttype: int, offset: int):
        from gguf import GGMLQuantizationType

        self.meta, self.name, self.shape, self.offset = meta, name, ne, offset
        self.tensor_type = GGMLQuantizationType(ttype)

    @property
    def raw(self) -> np.ndarray:
        from gguf import GGML_QUANT_SIZES

        block, nbytes = GGML_QUANT_SIZES[self.tensor_type]
        row = self.shape[0] // block * nbytes
        rows = [int(x) for x in reversed(self.shape[1:])]
        n = row * int(np.prod(rows or [1]))
        start = self.meta.data_offset + self.offset
        return np.frombuffer(self.meta.buf, dtype=np.uint8, count=n, offset=start).reshape(*rows, row)

    def release(self) -> None:
        """Unmap this tensor's pages from the process (they stay in the page cache; a later read
        maps them again): converting a GGUF then holds about one tensor of the file resident,
        not all of it."""
        import mmap

        if not hasattr(mmap, "MADV_DONTNEED"):  # pragma: no cover - not Linux/macOS
            return
        start = self.meta.data_offset + self.offset
        page = start // mmap.PAGESIZE * mmap.PAGESIZE
        self.meta.buf.madvise(mmap.MADV_DONTNEED, page, start + self.raw.nbytes - page)

    def values(self) -> np.ndarray:
        """Dequantized float32 values, shaped ``reversed(ne)`` (rows first)."""
        from gguf.quants import dequantize

        return np.asarray(dequantize(self.raw, self.tensor_type), dtype=np.float32)


class Meta:
    """The metadata and tensor directory of one GGUF, read straight from the file (gguf-py's
    GGUFReader parses every token string through numpy views: ~10 s for a 49k vocabulary,
    minutes for 128k+merges). Tensor bytes are read lazily from a memory map."""

    def __init__(self, path: str | os.PathLike[str]):
        import mmap
        import struct

        self.path = str(path)
        with open(self.path, "rb") as fh:
            self.buf = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        b = self.buf
        if not is_gguf_magic(b[:4]):
            raise ValueError(f"{self.path} is not a GGUF file")
        version, n_tensors, n_kv = struct.unpack_from("<IQQ", b, 4)
        if version < 2:
            raise ValueError(f"{self.path}: GGUF version {version} is too old")
        pos = 24
        self.kv: dict[str, Any] = {}
        self.kv_bytes: dict[str, tuple[int, int]] = {}  # key -> (start, end) of its raw entry

        def string(p: int) -> tuple[str, int]:
            (n,) = struct.unpack_from("<Q", b, p)
            return b[p + 8:p + 8 + n].decode("utf-8", errors="replace"), p + 8 + n

        def value(t: int, p: int) -> tuple[Any, int]:
            if t in _SCALAR:
                fmt = _SCALAR[t]
                return struct.unpack_from(fmt, b, p)[0], p + struct.calcsize(fmt)
            if t == 8:
                return string(p)
            if t == 9:
                et, n = struct.unpack_from("<IQ", b, p)
                p += 12
                if et in _SCALAR and et != 7:
                    size = struct.calcsize(_SCALAR[et])
                    if n > _BIG_ARRAY:
                        return None, p + n * size
                    return list(struct.unpack_from(f"<{n}{_SCALAR[et][1]}", b, p)), p + n * size
                out = [] if n <= _BIG_ARRAY else None
                for _ in range(n):
                    v, p = value(et, p)
                    if out is not None:
                        out.append(v)
                return out, p
            raise ValueError(f"{self.path}: unknown GGUF value type {t}")

        for _ in range(n_kv):
            start = pos
            key, pos = string(pos)
            (vt,) = struct.unpack_from("<I", b, pos)
            val, pos = value(vt, pos + 4)
            self.kv_bytes[key] = (start, pos)
            if val is not None:
                self.kv[key] = val
        infos = []
        for _ in range(n_tensors):
            name, pos = string(pos)
            (nd,) = struct.unpack_from("<I", b, pos)
            ne = list(struct.unpack_from(f"<{nd}Q", b, pos + 4))
            pos += 4 + 8 * nd
            ttype, off = struct.unpack_from("<IQ", b, pos)
            pos += 12
            infos.append((name, ne, ttype, off))
        align = int(self.kv.get("general.alignment", 32))
        self.data_offset = -(-pos // align) * align
        self.arch: str = str(self.kv.get("general.architecture", ""))
        self.tensor_list = [Tensor(self, *i) for i in infos]
        self.tensors = {t.name: t for t in self.tensor_list}

    def get(self, key: str, default: Any = None) -> Any:
        """``{arch}.{key}``."""
        return self.kv.get(f"{self.arch}.{key}", default)

    def has(self, key: str) -> bool:
        return f"{self.arch}.{key}" in self.kv

    def uniform(self, key: str, default: Any = None, what: str | None = None) -> Any:
        """A per-model value that llama.cpp also accepts per layer (arrays): refuse non-uniform arrays."""
        v = self.get(key, default)
        if isinstance(v, list):
            if not v or any(x != v[0] for x in v):
                raise Unsupported(f"{self.arch}: per-layer {what or key} ({v[:8]}...) is not supported")
            v = v[0]
        return v

    def tensor_type(self, name: str) -> str | None:
        t = self.tensors.get(name)
        return t.tensor_type.name if t is not None else None

    def file_type(self) -> str:
        """The most common weight type of the 2-D tensors (``"Q4_K"``, ``"F32"``...)."""
        from collections import Counter

        c = Counter(t.tensor_type.name for t in self.tensor_list if len(t.shape) >= 2)
        return c.most_common(1)[0][0] if c else "F32"

    def tokenizer_digest(self, salt: str = "") -> str:
        """sha256 over the raw bytes of every ``tokenizer.*`` entry but the chat template (plus ``salt``)."""
        import hashlib

        h = hashlib.sha256(salt.encode())
        for key in sorted(self.kv_bytes):
            if key.startswith("tokenizer.") and not key.startswith("tokenizer.chat_template"):
                s, e = self.kv_bytes[key]
                h.update(self.buf[s:e])
        return h.hexdigest()


_metas: dict[tuple, Meta] = {}


def read_meta(path) -> Meta:
    """:class:`Meta` of ``path``, remembered while the file is unchanged (a few per process)."""
    st = os.stat(path)
    key = (os.path.realpath(path), st.st_size, st.st_mtime_ns)
    if key not in _metas:
        if len(_metas) >= 8:
            _metas.pop(next(iter(_metas)))
        _metas[key] = Meta(path)
    return _metas[key]
