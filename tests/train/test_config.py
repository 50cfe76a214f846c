"""TOML config + CLI override precedence and validation messages."""

from __future__ import annotations

import pytest

from train.config import ConfigError, TrainConfig, load_toml, make_config, parse_layers


def test_toml_then_flags(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('[train]\nlr = 1e-4\nlora-r = 8\ndata = "trees"\nobjective = "dpo"\n')
    vals = load_toml(f)
    cfg = make_config(vals, lr=None, lora_r=4)
    assert (cfg.lr, cfg.lora_r, cfg.data, cfg.objective) == (1e-4, 4, ["trees"], "dpo")
    assert make_config().lr == TrainConfig().lr


@pytest.mark.parametrize(
    "text, msg",
    [("bogus = 1\n", "unknown key 'bogus'"), ("lr = \n", "not valid TOML")],
)
def test_bad_toml(tmp_path, text, msg):
    f = tmp_path / "c.toml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=msg):
        load_toml(f)
    with pytest.raises(ConfigError, match="does not exist"):
        load_toml(tmp_path / "missing.toml")


@pytest.mark.parametrize(
    "kw, flag",
    [({"objective": "ppo"}, "--objective"), ({"beta": 0}, "--beta"), ({"eval_fraction": 1.0}, "--eval-fraction"),
     ({"lora_r": 0}, "--lora-r"), ({"rejected_tokens": 0}, "--rejected-tokens"), ({"kl_weight": -1}, "--kl-weight"),
     ({"kl_mode": "sampled"}, "--kl-mode"), ({"lora_layers": "last:x"}, "--lora-layers"),
     ({"lora_layers": "3-1"}, "--lora-layers")],
)
def test_validation_names_the_flag(kw, flag):
    with pytest.raises(ConfigError, match=flag):
        make_config(**kw)


def test_lora_layers_spec():
    assert parse_layers("all", 30) is None
    assert parse_layers("last:3", 30) == [27, 28, 29]
    assert parse_layers("20-22, 5", 30) == [5, 20, 21, 22]
    with pytest.raises(ValueError, match="only 30 layers"):
        parse_layers("last:31", 30)
    with pytest.raises(ValueError, match="layer 30 does not exist; the model has layers 0-29"):
        parse_layers("28-30", 30)
    with pytest.raises(ValueError, match="last:N"):
        parse_layers("last:0")
