import argparse
import tomllib

import pytest

from kdarch.config import ConfigError
from kdarch.train.config import (DistillSection, ModelSection, RunConfig, TrainSection, add_config_flags, field_docs,
                                 load_run_config, overrides_from_args)


def write(tmp_path, text):
    p = tmp_path / "run.toml"
    p.write_text(text)
    return p


def test_defaults_and_toml_file(tmp_path):
    assert load_run_config() == RunConfig()
    cfg = load_run_config(write(tmp_path, """
[model]
preset = "debug"
hidden_size = 96
[train]
lr = 1e-3
steps = 7
[distill]
alpha = "cosine:0.9->0.3"
mtp_depth_weights = [1.0]
[teacher]
model = {preset = "tiny", hidden_size = 384}
train = {steps = 50}
[[students]]
model = {preset = "debug"}
[[students]]
name = "second"
model = {preset = "debug", n_layers = 1}
"""))
    assert cfg.model == ModelSection("debug", {"hidden_size": 96})
    assert cfg.train.lr == 1e-3 and cfg.train.steps == 7
    assert cfg.distill.alpha == "cosine:0.9->0.3" and cfg.distill.mtp_depth_weights == [1.0]
    assert cfg.teacher.model.overrides == {"hidden_size": 384}
    assert cfg.teacher.train.steps == 50 and cfg.teacher.train.lr == 1e-3  # stage train = [train] + its overrides
    assert [s.name for s in cfg.students] == ["student", "second"]
    assert cfg.model.build(vocab_size=300, seq_len=64).hidden_size == 96


def test_resolved_config_round_trips_through_toml(tmp_path):
    cfg = load_run_config(write(tmp_path, """
[model]
preset = "debug"
[train]
steps = 3
[teacher]
model = {preset = "debug", hidden_size = 96}
train = {steps = 5}
[[students]]
name = "student"
model = {preset = "debug"}
"""))
    text = cfg.to_toml()
    tomllib.loads(text)
    assert load_run_config(write(tmp_path, text)) == cfg


@pytest.mark.parametrize("text, needle", [
    ("[train]\nlr = 'fast'", "train.lr: expected float"),
    ("[train]\nsteps = 0", "train.steps: expected an int >= 1"),
    ("[train]\nbogus = 1", "unknown field(s) ['bogus']"),
    ("[model]\npreset = 'huge'", "model.preset: expected one of"),
    ("[model]\nnot_a_field = 1", "ModelConfig fields, got unknown ['not_a_field']"),
    ("[distill]\nkind = 3", "distill.kind: expected str"),
    ("[distill]\nfeature_loss = 'l1'", "distill.feature_loss"),
    ("[optimizer]\nlr = 1", "unknown table(s) ['optimizer']"),
    ("[train\n", "not valid TOML"),
    ("[[students]]\nmodel = {preset = 'debug'}\nepochs = 3", "students[0]: unknown field(s) ['epochs']"),
])
def test_bad_config_names_the_field(tmp_path, text, needle):
    with pytest.raises(ConfigError) as e:
        load_run_config(write(tmp_path, text))
    assert needle in str(e.value)


def test_missing_file_and_sequence_longer_than_context(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_run_config(tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match="data.seq_len=256 exceeds the model's context model.max_seq_len=128"):
        ModelSection("debug").build(vocab_size=300, seq_len=256)


def test_flags_override_the_file_and_are_documented(tmp_path):
    p = argparse.ArgumentParser()
    add_config_flags(p)
    args = p.parse_args(["--train.lr", "0.01", "--model.hidden_size", "80", "--train.progress", "false",
                         "--distill.mtp_depth_weights", "[0.5, 0.5]"])
    cfg = load_run_config(write(tmp_path, "[train]\nlr = 1e-4\nsteps = 9"), overrides_from_args(args))
    assert cfg.train.lr == 0.01 and cfg.train.steps == 9 and cfg.train.progress is False
    assert cfg.model.overrides == {"hidden_size": 80} and cfg.distill.mtp_depth_weights == [0.5, 0.5]
    text = p.format_help()
    for cls in (TrainSection, DistillSection):
        for name, doc in field_docs(cls).items():
            assert doc.split()[0] in text, name
    assert "--model.kv_lora_rank" in text and "--data.seq_len" in text
