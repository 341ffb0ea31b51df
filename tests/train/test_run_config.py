import argparse

import pytest
import tomllib

from kdarch.config import ConfigError
from kdarch.train.config import DistillSection, ModelSection, RunConfig, Stage, StageSpec, TrainSection, load_run_config
from kdarch.train.flags import add_config_flags, field_docs, overrides_from_args

DEFAULT_T = Stage("teacher", ModelSection("tiny", {"n_layers": 6}), TrainSection(steps=180))
DEFAULT_S = Stage("student", ModelSection("tiny"), TrainSection(steps=100))


def write(tmp_path, text):
    p = tmp_path / "run.toml"
    p.write_text(text)
    return p


def test_defaults_and_toml_file(tmp_path):
    assert load_run_config() == RunConfig()
    cfg = load_run_config(write(tmp_path, """
[train]
lr = 1e-3
steps = 7
[distill]
alpha = "cosine:0.9->0.3"
mtp_depth_weights = [1.0]
[teacher]
model = {hidden_size = 384}
train = {steps = 50}
[[students]]
model = {preset = "debug"}
[[students]]
name = "second"
model = {preset = "debug", n_layers = 1}
"""))
    assert cfg.train.lr == 1e-3 and cfg.train.steps == 7
    assert cfg.distill.alpha == "cosine:0.9->0.3" and cfg.distill.mtp_depth_weights == [1.0]
    assert cfg.teacher == StageSpec(None, {"hidden_size": 384}, {"steps": 50})
    teacher, students = cfg.stages(DEFAULT_T, DEFAULT_S)
    # a stage table is laid over the task's default stage: the default teacher's 6 layers stay
    assert teacher.model == ModelSection("tiny", {"n_layers": 6, "hidden_size": 384})
    assert teacher.train.steps == 50 and teacher.train.lr == 1e-3  # its defaults, then [train], then its own table
    assert [s.name for s in students] == ["student", "second"]
    assert students[0].train.steps == 7 and students[1].model == ModelSection("debug", {"n_layers": 1})


def test_train_section_replaces_stage_defaults_only_where_set():
    teacher, (student,) = RunConfig().stages(DEFAULT_T, DEFAULT_S)
    assert (teacher.train.steps, student.train.steps) == (180, 100)
    teacher, (student,) = RunConfig(train=TrainSection(steps=5, lr=1e-3)).stages(DEFAULT_T, DEFAULT_S)
    assert (teacher.train.steps, student.train.steps, student.train.lr) == (5, 5, 1e-3)
    # [model] is the default student's architecture, laid over it; another preset starts over
    _, (student,) = RunConfig(model=ModelSection("tiny", {"n_layers": 2})).stages(DEFAULT_T, DEFAULT_S)
    assert student.model == ModelSection("tiny", {"n_layers": 2})
    with pytest.raises(ConfigError, match=r"^model: expected no \[model\] section beside \[\[students\]\]"):
        RunConfig(model=ModelSection("debug"), students=(StageSpec(),)).stages(DEFAULT_T, DEFAULT_S)


def test_resolved_config_round_trips_through_toml(tmp_path):
    cfg = load_run_config(write(tmp_path, """
[train]
steps = 3
[teacher]
model = {preset = "debug", hidden_size = 96}
train = {steps = 5}
[[students]]
name = "student"
model = {preset = "debug"}
"""))
    teacher, students = cfg.stages(DEFAULT_T, DEFAULT_S)
    text = cfg.to_toml(teacher, students)
    tomllib.loads(text)
    again = load_run_config(write(tmp_path, text))
    # the written stages are complete: whatever the defaults, they resolve to what ran
    other_defaults = Stage("x", ModelSection("small"), TrainSection(steps=999, lr=0.5))
    assert again.stages(other_defaults, other_defaults) == (teacher, students)


@pytest.mark.parametrize("text, needle", [
    ("[train]\nlr = 'fast'", "train.lr: expected a finite number, got 'fast'"),
    ("[train]\nsteps = 0", "train.steps: expected an int >= 1, got 0"),
    ("[train]\nbogus = 1", "unknown field(s) ['bogus']"),
    ("[model]\npreset = 'huge'", "model.preset: expected one of"),
    ("[model]\nnot_a_field = 1", "got ['not_a_field']"),
    ("[distill]\nkind = 3", "distill.kind: expected a string, got 3"),
    ("[distill]\nkind = 'kl'", "distill.kind: expected one of 'forward_kl'"),
    ("[distill]\nalpha = 'linaer:0.9->0.1'", "distill.alpha: schedule 'linaer:0.9->0.1'"),
    ("[distill]\nfeature_loss = 'l1'", "distill.feature_loss"),
    ("[optimizer]\nlr = 1", "unknown table(s) ['optimizer']"),
    ("[train\n", "not valid TOML"),
    ("[[students]]\nmodel = {preset = 'debug'}\nepochs = 3", "students.0: unknown field(s) ['epochs']"),
    ("[teacher]\ntrain = {steps = 'ten'}", "teacher.train.steps: expected an int, got 'ten'"),
    ("[[students]]\nmodel = {n_layers = 'two'}", "students.0.model"),
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
    cfg = load_run_config(write(tmp_path, "[train]\nlr = 1e-4\nsteps = 9"),
                          {**overrides_from_args(args), "teacher.train.steps": 4, "students.1.model.n_layers": 1})
    assert cfg.train.lr == 0.01 and cfg.train.steps == 9 and cfg.train.progress is False
    assert cfg.model.overrides == {"hidden_size": 80} and cfg.distill.mtp_depth_weights == [0.5, 0.5]
    assert cfg.teacher == StageSpec(train={"steps": 4})
    assert cfg.students == (StageSpec(), StageSpec(model={"n_layers": 1}))  # the chain grows to student 1
    text = p.format_help()
    for cls in (TrainSection, DistillSection):
        for name, doc in field_docs(cls).items():
            assert doc.split()[0] in text, name
    assert "--model.kv_lora_rank" in text and "--data.seq_len" in text


def test_the_quick_run_keeps_its_debug_sized_student():
    """[model] at its defaults names no architecture, so the quick run's own student stands (it was once replaced
    by the tiny preset, which made `kdarch distill --quick` several times slower)."""
    from kdarch.train.pipeline import QUICK_STUDENT, stages_of
    teacher, (student,) = stages_of(RunConfig(), quick=True)
    assert student.model == QUICK_STUDENT.model and student.model.preset == "debug"
    _, (given,) = stages_of(RunConfig(model=ModelSection("tiny", {"n_layers": 3})), quick=True)
    assert given.model == ModelSection("tiny", {"n_layers": 3})
