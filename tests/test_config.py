"""Presets, flag overrides and validation: every mistake is one clear UserError naming the key."""

import json

import pytest

from simclr_lib.config import FIELDS, PRESETS, Config, load_config, make_config
from simclr_lib.errors import UserError


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_is_valid(name):
    config = make_config(name)
    assert config.preset == name and set(config.to_dict()) == set(FIELDS)


def test_preset_recipes():
    paper = make_config("paper-r50")
    assert (paper.backbone, paper.batch_size, paper.optimizer, paper.temperature) == \
        ("resnet50", 1024, "lars", 0.5)
    assert paper.cifar_stem and not paper.blur_prob
    seed = make_config("seed-r50-bs512")
    assert (seed.optimizer, seed.lr, seed.temperature, seed.batch_size) == ("adam", 3e-4, 0.07, 512)
    r18 = make_config("cifar10-r18")
    assert (r18.backbone, r18.batch_size, r18.epochs, r18.weight_decay) == ("resnet18", 512, 1000, 1e-4)
    assert r18.proj_batch_norm == "all"  # the official code's head
    short = make_config("cifar10-r18-10min")  # lightly's optimiser: 0.06 x batch/128 is 0.12 x batch/256
    assert (short.optimizer, short.lr, short.lr_scaling, short.weight_decay, short.weight_decay_all) == (
        "sgd", 0.12, "linear", 5e-4, True)
    assert short.time_budget == 480 and short.proj_batch_norm == "hidden"


def test_overrides_win_and_none_keeps_the_preset():
    config = make_config("cifar10-r18", epochs=3, batch_size=None)
    assert config.epochs == 3 and config.batch_size == 512
    assert config.warmup_epochs == pytest.approx(0.3)  # a short run of a long recipe warms up for a tenth
    with pytest.raises(UserError, match="warmup_epochs must be between 0 and epochs"):
        make_config("cifar10-r18", epochs=3, warmup_epochs=5)


@pytest.mark.parametrize("key, value, words", [
    ("batch_size", 1, "batch_size must be at least 2"),
    ("temperature", 0.0, "temperature must be greater than 0"),
    ("temperature", -1.0, "temperature"),
    ("optimizer", "rmsprop", "optimizer must be one of"),
    ("epochs", "ten", "'epochs' must be int"),
    ("gray_prob", 1.5, "gray_prob must be in [0, 1]"),
    ("color_strength", 2.6, "color_strength must be in [0, 2.5]"),  # hue 0.2 s must stay within 0.5
    ("precision", "fp8", "precision must be one of auto, bf16, fp16, fp32"),
    ("proj_batch_norm", "every", "proj_batch_norm must be one of none, hidden, all"),
    ("lars_eta", 0.0, "lars_eta must be greater than 0"),
    ("weight_decay_all", "yes", "'weight_decay_all' must be bool"),
])
def test_bad_values_name_the_key(key, value, words):
    with pytest.raises(UserError, match=words.replace("[", r"\[").replace("]", r"\]")):
        make_config("quick", **{key: value})


def test_unknown_preset_and_key():
    with pytest.raises(UserError, match="unknown preset 'nope'"):
        make_config("nope")
    with pytest.raises(UserError, match="unknown config key 'epoch'"):
        Config().replace(epoch=3)


def test_load_config_roundtrip_and_errors(tmp_path):
    path = tmp_path / "config.json"
    config = make_config("quick", epochs=2)
    config.save(path)
    assert load_config(path) == config
    path.write_text("{not json")
    with pytest.raises(UserError, match="cannot read config"):
        load_config(path)
    path.write_text(json.dumps({**config.to_dict(), "lr": "fast"}))
    with pytest.raises(UserError, match="'lr' must be float"):
        load_config(path)
    # config.json of earlier versions: proj_batch_norm was true (after the hidden layer) or false
    for old, new in ((True, "hidden"), (False, "none")):
        path.write_text(json.dumps({**config.to_dict(), "proj_batch_norm": old}))
        assert load_config(path).proj_batch_norm == new


def test_config_is_frozen_and_replace_validates():
    config = make_config("quick")
    with pytest.raises(AttributeError):
        config.epochs = 3
    assert config.replace(epochs=3).epochs == 3 and config.epochs == 16
    with pytest.raises(UserError, match="lr must be greater than 0"):
        config.replace(lr=-1.0)
    assert isinstance(Config(lr=1).lr, float)  # an int where a float belongs (e.g. from JSON) becomes a float
