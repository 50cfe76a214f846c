"""Write an f32 copy of a quantized GGUF (same metadata, tensors dequantized by gguf-py).

transformers dequantizes GGUF weights with the same gguf-py code, so llama.cpp running the
copy and torch running ``from_pretrained(gguf_file=...)`` compute one model: their outputs
differ only by summation order, on any CPU."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def dequantize_gguf(src: str | Path, dst: str | Path) -> Path:
    import gguf

    reader = gguf.GGUFReader(str(src))
    writer = gguf.GGUFWriter(str(dst), reader.fields["general.architecture"].contents())
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":  # the writer adds these
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        value = int(gguf.LlamaFileType.ALL_F32) if name == "general.file_type" else field.contents()
        writer.add_key_value(name, value, vtype, sub_type=sub)
    for t in reader.tensors:
        data = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        writer.add_tensor(t.name, data, raw_dtype=gguf.GGMLQuantizationType.F32)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(dst)
