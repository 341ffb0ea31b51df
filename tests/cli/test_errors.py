"""Every error before any work: each kind of bad input ends the command with exit status 2 and one line naming
the field or flag, before data is prepared or a model is built (the data step is replaced here by one that
fails the test); flags reach every stage; --resume refuses a directory that holds no such run."""
import json
import subprocess
import sys

import pytest

from kdarch.cli import build_parser, main
from kdarch.train import pipeline
from kdarch.train.config import load_run_config
from kdarch.train.flags import overrides_from_args, stage_overrides


@pytest.fixture(autouse=True)
def no_work(monkeypatch):
    def work(*a, **k):
        raise AssertionError("work started before the error was found")
    monkeypatch.setattr(pipeline, "prepare_data", work)


def run(args, capsys) -> tuple[int, str]:
    try:
        code = main(args)
    except SystemExit as e:  # argparse's own usage errors
        code = e.code
    err = capsys.readouterr().err
    assert "Traceback" not in err and "work started" not in err
    return code, err


@pytest.fixture
def cache_dir(tmp_path):
    d = tmp_path / "cache"
    d.mkdir()
    (d / "manifest.json").write_text("{}")
    return d


@pytest.fixture
def toml(tmp_path):
    def write(text):
        (tmp_path / "run.toml").write_text(text)
        return str(tmp_path / "run.toml")
    return write


@pytest.mark.parametrize("args, needle", [
    (["distill", "--distill.kind", "kl"], "distill.kind: expected one of 'forward_kl'"),
    (["distill", "--distill.alpha", "linaer:0.9->0.1"], "distill.alpha: schedule 'linaer:0.9->0.1'"),
    (["distill", "--distill.temperature", "cosine:2->"], "distill.temperature"),
    (["distill", "--model.n_layers", "two"], "--model.n_layers: expected an int, got 'two'"),
    (["distill", "--teacher.train.steps", "ten"], "--teacher.train.steps: expected an int, got 'ten'"),
    (["distill", "--students.0.model.n_heads", "0"], "students.0.model.n_heads: expected an int >= 1, got 0"),
    (["distill", "--teacher.model.kv_lora_rank", "-3"], "teacher.model.kv_lora_rank: expected an int >= 1"),
    (["distill", "--data.seq_len", "4096"], "data.seq_len=4096 exceeds the model's context"),
    (["distill", "--data.dataset", "/no/such/corpus.txt"], "data.dataset: expected \"embedded\""),
    (["train", "--data.tokenizer", "/no/such/tokenizer"], "data.tokenizer: expected \"bpe\""),
    (["distill", "--distill.teacher", "/no/such/dir"], "distill.teacher: expected a directory holding"),
    (["distill", "--distill.mtp_depth_weights", "[1, 1]"], "distill.mtp_depth_weights: expected 1 weights"),
    (["distill", "--task", "arithmetic", "--data.seq_len", "32"], "data.seq_len: expected no [data] settings"),
    (["train", "--train.stpes", "5"], "did you mean --train.steps"),
    (["distill", "--teacher.train.stpes", "5"], "did you mean --teacher.train.steps"),
    (["train", "--train.lr", "-1"], "train.lr: expected a number > 0, got -1"),
    (["distill", "--distill.student_init", "teacher", "--model.n_layers", "7"],
     "student: distill.student_init = \"teacher\": the student's moe blocks: expected at most the teacher's 5, got 6"),
])
def test_bad_input_fails_before_any_work_naming_the_field(tmp_path, capsys, args, needle):
    code, err = run([*args[:1], "--out", str(tmp_path / "run"), *args[1:]], capsys)
    assert code == 2 and needle in err, err
    assert not (tmp_path / "run").exists()  # not even the run directory


def test_toml_errors_and_teacher_kinds(tmp_path, capsys, toml, cache_dir):
    code, err = run(["distill", "--config", toml('[model]\nn_layers = "two"\n'), "--out", str(tmp_path / "a")], capsys)
    assert code == 2 and "model.n_layers: expected an int, got 'two'" in err
    code, err = run(["distill", "--distill.teacher", str(cache_dir), "--distill.feature_weight", "0.1",
                     "--out", str(tmp_path / "b")], capsys)
    assert code == 2 and "distill.feature_weight: expected 0 with a logit-cache teacher" in err
    code, err = run(["distill", "--config", toml("[model]\npreset = 'debug'\n[[students]]\nname = 's'\n"),
                     "--out", str(tmp_path / "c")], capsys)
    assert code == 2 and "model: expected no [model] section beside [[students]]" in err
    code, err = run(["distill", "--distill.teacher", str(cache_dir), "--distill.student_init", "teacher",
                     "--out", str(tmp_path / "d")], capsys)
    assert code == 2 and 'distill.student_init: expected "random" or "auto" with a teacher that is not a kdarch' in err


def test_stage_flags_reach_every_stage():
    parser = build_parser()
    args, extra = parser.parse_known_args(["distill", "--train.lr", "0.01", "--teacher.train.steps", "7",
                                           "--students.0.model.n_layers", "2", "--students.1.train.steps", "3",
                                           "--students.1.name", "second", "--scratch", "false"])
    run = load_run_config(None, {**overrides_from_args(args), **stage_overrides(extra, parser.commands["distill"])})
    teacher, students = pipeline.stages_of(run)
    assert (teacher.train.steps, teacher.train.lr) == (7, 0.01)
    assert teacher.model == pipeline.DEFAULT_TEACHER.model  # the default teacher, only its steps changed
    assert students[0].model.overrides == {**pipeline.DEFAULT_STUDENT.model.overrides, "n_layers": 2}
    assert students[0].train.steps == 100
    assert students[1].name == "second" and students[1].train.steps == 3 and run.scratch is False
    assert "--train.steps 50 makes both 50" in parser.commands["distill"].format_help()


def test_resume_refuses_a_directory_that_holds_no_such_run(tmp_path, capsys):
    code, err = run(["train", "--resume", "--out", str(tmp_path / "typo")], capsys)
    assert code == 2 and "--resume: expected --out to be the directory of an earlier 'train' run" in err
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    code, err = run(["train", "--resume", "--out", str(other)], capsys)
    assert code == 2 and "not a kdarch run directory (no run.json)" in err
    (other / "run.json").write_text(json.dumps({"run": "distill-lm"}))
    code, err = run(["train", "--resume", "--out", str(other)], capsys)
    assert code == 2 and "which is a 'distill-lm' run" in err
    code, err = run(["train", "--out", str(other)], capsys)
    assert code == 2 and "--out: expected a new or empty run directory" in err


def test_convert_refuses_a_non_empty_destination(tmp_path, capsys):
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    code, err = run(["convert", str(tmp_path / "src"), str(dst), "--format", "hf"], capsys)
    assert code == 2 and "pass --force" in err and (dst / "keep.txt").read_text() == "mine"


def test_a_bad_flag_exits_2_in_a_fresh_process(tmp_path):
    """The same check as a user sees it: a new process, no traceback, exit 2, seconds rather than minutes."""
    p = subprocess.run([sys.executable, "-m", "kdarch", "distill", "--distill.kind", "kl",
                        "--out", str(tmp_path / "r")],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "distill.kind: expected one of" in p.stderr and "Traceback" not in p.stderr
    assert not (tmp_path / "r").exists()


def test_eval_without_a_tokenizer_is_a_usage_error(tmp_path, capsys):
    import kdarch
    kdarch.save_pretrained(kdarch.CausalLM(kdarch.get_preset("debug")), tmp_path / "m")
    code, err = run(["eval", "--model", str(tmp_path / "m")], capsys)
    assert code == 2 and "--model: expected a model directory with its tokenizer.json" in err
