"""An Ollama ``Modelfile`` next to ``adapter.gguf``: ``FROM`` the base GGUF, ``ADAPTER`` the
LoRA, the chat template and stop tokens taken from the base GGUF, so that

    ollama create my-steered -f OUT/Modelfile && ollama run my-steered

serves the steered model where users deploy.

Ollama templates are Go templates, GGUF chat templates Jinja: a template is recognised by
its control tokens (ChatML, Llama-3, Gemma, Phi-3, Mistral) and written in Ollama's own form
for that family; an unrecognised one is left out (Ollama then falls back to what it detects
from the GGUF) and the file says so. Stop tokens are the family's end-of-turn tokens plus
the GGUF's EOS token.
"""

from __future__ import annotations

import os
from pathlib import Path

from steer_tui.core.gguf import gguf_metadata

CHATML = """{{- if .System }}<|im_start|>system
{{ .System }}<|im_end|>
{{ end }}{{- range .Messages }}<|im_start|>{{ .Role }}
{{ .Content }}<|im_end|>
{{ end }}<|im_start|>assistant
"""

LLAMA3 = """{{- if .System }}<|start_header_id|>system<|end_header_id|>

{{ .System }}<|eot_id|>{{ end }}{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>

{{ .Content }}<|eot_id|>{{ end }}<|start_header_id|>assistant<|end_header_id|>

"""

GEMMA = """{{- range $i, $m := .Messages }}<start_of_turn>{{ if eq $m.Role "assistant" }}model{{ else }}user{{ end }}
{{ if and (eq $i 0) $.System }}{{ $.System }}

{{ end }}{{ $m.Content }}<end_of_turn>
{{ end }}<start_of_turn>model
"""

PHI3 = """{{- if .System }}<|system|>
{{ .System }}<|end|>
{{ end }}{{- range .Messages }}<|{{ .Role }}|>
{{ .Content }}<|end|>
{{ end }}<|assistant|>
"""

MISTRAL = """{{- range $i, $m := .Messages }}{{ if eq $m.Role "user" }}[INST] {{ if and (eq $i 0) $.System }}{{ $.System }}

{{ end }}{{ $m.Content }}[/INST]{{ else }}{{ $m.Content }}</s>{{ end }}{{ end }}"""

# (family, marker in the Jinja template, Ollama template, end-of-turn stop tokens)
FAMILIES = (
    ("chatml", "<|im_start|>", CHATML, ("<|im_end|>",)),
    ("llama3", "<|start_header_id|>", LLAMA3, ("<|eot_id|>",)),
    ("gemma", "<start_of_turn>", GEMMA, ("<end_of_turn>",)),
    ("phi3", "<|assistant|>", PHI3, ("<|end|>",)),
    ("mistral", "[INST]", MISTRAL, ("[INST]",)),
)


def template_family(jinja: str | None) -> tuple[str, str, tuple[str, ...]] | None:
    """(family, Ollama template, stop tokens) for a GGUF chat template, or None."""
    if not jinja:
        return None
    for family, marker, template, stops in FAMILIES:
        if marker in jinja:
            return family, template, stops
    return None


def _eos_text(base_gguf: Path) -> str | None:
    import gguf

    reader = gguf.GGUFReader(str(base_gguf))
    eos = reader.fields.get("tokenizer.ggml.eos_token_id")
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    if eos is None or tokens is None:
        return None
    i = int(eos.contents())
    vocab = tokens.contents()
    return vocab[i] if 0 <= i < len(vocab) else None


def _quote(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_modelfile(out_dir: str | os.PathLike[str], base_gguf: str | os.PathLike[str],
                    adapter_gguf: str | os.PathLike[str]) -> Path:
    """Write ``out_dir/Modelfile`` for ``base_gguf`` + ``adapter_gguf`` (absolute paths, so
    ``ollama create`` works from any directory). Returns its path."""
    base, adapter = Path(base_gguf).resolve(), Path(adapter_gguf).resolve()
    meta = gguf_metadata(base, ("tokenizer.chat_template", "general.architecture"))
    found = template_family(meta.get("tokenizer.chat_template"))
    lines = [
        "# Ollama: ollama create NAME -f Modelfile && ollama run NAME",
        "# written by steer-train: the base model you steered and the LoRA adapter trained on your steers",
        f"FROM {base}",
        f"ADAPTER {adapter}",
    ]
    stops: list[str] = []
    if found is not None:
        family, template, family_stops = found
        lines.append(f"# chat template: {family} (from the GGUF's tokenizer.chat_template)")
        lines.append(f'TEMPLATE """{template}"""')
        stops.extend(family_stops)
    else:
        lines.append("# chat template: not recognised; Ollama uses the one it detects in the GGUF")
    eos = _eos_text(base)
    if eos and eos not in stops:
        stops.append(eos)
    for s in stops:
        lines.append(f"PARAMETER stop {_quote(s)}")
    path = Path(out_dir) / "Modelfile"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def parse_modelfile(text: str) -> dict[str, list[str]]:
    """Instructions of a Modelfile (``FROM``, ``ADAPTER``, ``TEMPLATE``, ``PARAMETER``), as
    Ollama reads them: one per line, ``\"\"\"`` strings spanning lines. For tests and checks."""
    out: dict[str, list[str]] = {}
    lines = text.split("\n")
    i = 0
    while i < len(lines):
        line = lines[i].strip()
        i += 1
        if not line or line.startswith("#"):
            continue
        cmd, _, rest = line.partition(" ")
        if rest.startswith('"""'):
            body = rest[3:]
            while '"""' not in body:
                if i >= len(lines):
                    raise ValueError(f"{cmd}: unterminated \"\"\" string")
                body += "\n" + lines[i]
                i += 1
            rest = body[: body.index('"""')]
        out.setdefault(cmd.upper(), []).append(rest)
    return out
