"""The Ollama Modelfile written next to adapter.gguf: parsed back, it names the base GGUF and
the adapter, and carries the family's chat template and stop tokens from the GGUF."""

from __future__ import annotations

import pytest

from train.modelfile import FAMILIES, parse_modelfile, template_family, write_modelfile

pytest.importorskip("gguf")


def test_bundled_model_modelfile(tmp_path, model_path):
    adapter = tmp_path / "adapter.gguf"
    adapter.write_bytes(b"GGUF")
    text = write_modelfile(tmp_path, model_path, adapter).read_text(encoding="utf-8")
    mf = parse_modelfile(text)
    assert mf["FROM"] == [str(model_path.resolve())]
    assert mf["ADAPTER"] == [str(adapter.resolve())]
    (template,) = mf["TEMPLATE"]
    assert template.startswith("{{- if .System }}<|im_start|>system") and template.endswith("<|im_start|>assistant\n")
    assert mf["PARAMETER"] == ['stop "<|im_end|>"']  # SmolLM2's EOS is <|im_end|> too: listed once
    assert "# chat template: chatml" in text


@pytest.mark.parametrize("jinja, family", [
    ("{% for m in messages %}<|im_start|>{{ m.role }}", "chatml"),
    ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>", "llama3"),
    ("{{ bos_token }}<start_of_turn>user", "gemma"),
    ("{% if m.role == 'user' %}<|user|>{% endif %}<|assistant|>", "phi3"),
    ("{{ bos_token }}[INST] {{ m.content }} [/INST]", "mistral"),
])
def test_each_family_is_recognised(jinja, family):
    found = template_family(jinja)
    assert found is not None and found[0] == family
    # every Go template parses as a Modelfile string and keeps its text
    mf = parse_modelfile(f'TEMPLATE """{found[1]}"""\n')
    assert mf["TEMPLATE"] == [found[1]]


def test_unknown_template_is_left_to_ollama(tmp_path, model_path, monkeypatch):
    import train.modelfile as m

    monkeypatch.setattr(m, "gguf_metadata", lambda path, keys: {"tokenizer.chat_template": "{{ custom }}"})
    text = write_modelfile(tmp_path, model_path, tmp_path / "a.gguf").read_text()
    assert "TEMPLATE" not in parse_modelfile(text) and "not recognised" in text
    assert parse_modelfile(text)["PARAMETER"] == ['stop "<|im_end|>"']  # the GGUF's EOS still stops


def test_families_have_distinct_markers():
    markers = [f[1] for f in FAMILIES]
    assert len(set(markers)) == len(markers)


def test_unterminated_string_is_refused():
    with pytest.raises(ValueError, match="unterminated"):
        parse_modelfile('TEMPLATE """abc\n')
