"""The app config file and the CLI's handling of bad arguments (a clear line, no traceback)."""

from __future__ import annotations

import json

import pytest

from steer_tui.cli import main
from steer_tui.ui.config import ConfigError, load_config
from steer_tui.ui.keys import ALL_KEYS, KEY_IDS


def test_missing_config_is_defaults(tmp_path):
    cfg = load_config(tmp_path / "none.toml")
    assert cfg.keymap == {} and cfg.sampling == {} and cfg.path is None


def test_config_keymap_and_sampling(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text('annotator = "ann"\nprob_colors = true\n[keymap]\n"session.pause" = "z, ctrl+space"\n[sampling]\ntemperature = 0.3\nmax_tokens = 64\n')
    cfg = load_config(p)
    assert cfg.keymap == {"session.pause": "z,ctrl+space"}
    assert cfg.sampling == {"temperature": 0.3, "max_tokens": 64}
    assert cfg.annotator == "ann" and cfg.prob_colors is True and cfg.path == p


@pytest.mark.parametrize(
    "body, needle",
    [
        ("[keymap\n", "not valid TOML"),
        ('[keymap]\n"session.nope" = "x"\n', "keymap.session.nope"),
        ('[keymap]\n"session.pause" = ""\n', "keymap.session.pause"),
        ("[sampling]\ntemperature = 'hot'\n", "sampling.temperature"),
        ("[sampling]\nbeam = 3\n", "sampling.beam"),
        ("colour = 1\n", "colour"),
        ("top_k = 0\n", "top_k"),
    ],
)
def test_bad_config_names_file_and_key(tmp_path, body, needle):
    p = tmp_path / "c.toml"
    p.write_text(body)
    with pytest.raises(ConfigError) as err:
        load_config(p)
    assert str(p) in str(err.value) and needle in str(err.value)


def test_binding_ids_are_unique_and_namespaced():
    ids = [k.id for k in ALL_KEYS]
    assert len(ids) == len(set(ids)) == len(KEY_IDS)
    assert all(i.split(".")[0] in ("session", "cursor", "app") for i in ids)


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--model", "/no/such/model.gguf"], "/no/such/model.gguf"),
        (["--task", "20990101-missing-0000"], "20990101-missing-0000"),
    ],
)
def test_cli_session_bad_arguments_are_one_line(tmp_path, monkeypatch, capsys, extra, needle):
    monkeypatch.setenv("STEER_CONFIG", str(tmp_path / "none.toml"))
    code = main(["session", "--store", str(tmp_path / "store"), *extra])
    err = capsys.readouterr().err
    assert code == 2 and needle in err and "Traceback" not in err


def test_cli_session_bad_config_and_tasks(tmp_path, monkeypatch, capsys):
    cfg = tmp_path / "c.toml"
    cfg.write_text("[keymap]\n'x.y' = 'a'\n")
    monkeypatch.setenv("STEER_CONFIG", str(cfg))
    assert main(["session", "--store", str(tmp_path / "s")]) == 2
    assert str(cfg) in capsys.readouterr().err
    monkeypatch.setenv("STEER_CONFIG", str(tmp_path / "none.toml"))
    bad = tmp_path / "q.jsonl"
    bad.write_text("{oops\n" + json.dumps({"nothing": 1}) + "\n")
    assert main(["session", "--store", str(tmp_path / "s"), "--tasks", str(bad)]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "Traceback" not in err
