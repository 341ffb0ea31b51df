"""The arithmetic (sequence-level) distillation run, with tiny stages and the teacher's writing simulated."""
import dataclasses
import json

import pytest

from kdarch.train import arithmetic as ar
from kdarch.train import reasoning
from kdarch.train.config import ModelSection, RunConfig, StageSpec, TrainSection
from kdarch.train.tokenizer import ByteTokenizer


def spec(name, preset, train, **fields):
    """A stage table, as written in a config file."""
    return StageSpec(name, {"preset": preset, **fields}, dataclasses.asdict(train))


class ScriptedModel:
    """Stands in for a model in `solve`: 'generates' the reference solution of each prompt."""

    def __init__(self, tok):
        self.tok = tok

    def eval(self):
        return self

    def generate(self, prompts, max_new_tokens, eos_token_id):
        out = []
        for ids in prompts:
            expr = self.tok.decode(ids)[len("Q: "):].strip()
            new = self.tok.encode(ar.solution(ar.Problem.from_expression(expr)))
            assert new[-1] == eos_token_id and len(new) <= max_new_tokens
            out.append(new)
        return out


def test_solve_encodes_prompts_and_decodes_completions():
    tok = ByteTokenizer()
    problems = ar.generate_problems(7, seed=5)
    assert reasoning.solve(ScriptedModel(tok), problems, tok, batch=3) == [ar.solution(p) for p in problems]


def test_arithmetic_run_reports_exact_match(tmp_path, monkeypatch):
    def half_right(model, problems, tok, batch=100):
        # Even problems solved correctly, odd ones with a wrong final answer: curation keeps half.
        return [ar.solution(p) if i % 2 == 0 else ar.solution(p).replace("A: ", "A: 1") for i, p in enumerate(problems)]

    monkeypatch.setattr(reasoning, "solve", half_right)
    monkeypatch.setattr(reasoning, "N_CURATE", 40)
    train = TrainSection(steps=2, batch_size=4, log_every=1, eval_sequences=4, progress=False, warmup_steps=1)
    run = RunConfig(train=train, teacher=spec("teacher", "debug", train, hidden_size=96, n_heads=6),
                    students=(spec("student", "debug", train),))
    report = reasoning.run_arithmetic(run, tmp_path, log=lambda *_: None)
    assert report["arithmetic"]["curation"] == {"total": 40, "correct": 20, "valid_steps": 20, "kept": 20}
    for key in ("teacher", "student", "scratch"):
        assert report["arithmetic"][key]["exact_match"] == 0.5
        assert {"eval_loss", "top1_agreement", "params_total"} <= set(report[key])
    assert report["student"]["train_tokens"] == report["scratch"]["train_tokens"]
    on_disk = json.loads((tmp_path / "report.json").read_text())
    assert on_disk["arithmetic"]["curation"]["kept"] == 20
    assert "Reasoning distillation (arithmetic)" in (tmp_path / "report.md").read_text()


def test_a_teacher_that_solves_nothing_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(reasoning, "solve", lambda model, problems, tok, batch=100: ["A: ?$"] * len(problems))
    monkeypatch.setattr(reasoning, "N_CURATE", 10)
    train = TrainSection(steps=1, batch_size=4, progress=False)
    run = RunConfig(train=train, teacher=spec("teacher", "debug", train), students=(spec("student", "debug", train),))
    with pytest.raises(RuntimeError, match="solved none of the curation problems"):
        reasoning.run_arithmetic(run, tmp_path, log=lambda *_: None)


def test_every_field_is_honoured_or_refused():
    """[model] and [train] shape the default stages (as in `kdarch distill`); [data], distill.teacher, a second
    student and [model] beside [[students]] cannot apply and are refused by name."""
    from kdarch.config import ConfigError
    from kdarch.train.config import DataSection, DistillSection
    teacher, student = reasoning.task_stages(RunConfig(model=ModelSection("tiny", {"n_layers": 3}),
                                                       train=TrainSection(lr=1e-3)))
    assert student.model.overrides["n_layers"] == 3  # on top of the task's own student
    assert student.model.overrides["hidden_size"] == reasoning.DEFAULT_STUDENT.model.overrides["hidden_size"]
    assert (teacher.train.lr, student.train.lr) == (1e-3, 1e-3)
    assert (teacher.train.steps, student.train.steps) == (reasoning.DEFAULT_TEACHER.train.steps,
                                                          reasoning.DEFAULT_STUDENT.train.steps)
    assert reasoning.task_stages(RunConfig(model=ModelSection("debug")))[1].model == ModelSection("debug")
    stage = StageSpec("s", {"preset": "debug"})
    for run, field in ((RunConfig(data=DataSection(seq_len=32)), "data.seq_len"),
                       (RunConfig(data=DataSection(dataset="x.txt")), "data.dataset"),
                       (RunConfig(distill=DistillSection(teacher="dir")), "distill.teacher"),
                       (RunConfig(students=(stage, stage)), "students"),
                       (RunConfig(model=ModelSection("debug"), students=(stage,)), "model")):
        with pytest.raises(ConfigError, match=f"^{field}: expected"):
            reasoning.task_stages(run)


def test_scratch_false_skips_the_baseline(tmp_path, monkeypatch):
    monkeypatch.setattr(reasoning, "solve", lambda model, problems, tok, batch=100: [ar.solution(p) for p in problems])
    monkeypatch.setattr(reasoning, "N_CURATE", 8)
    train = TrainSection(steps=1, batch_size=4, progress=False, eval_sequences=4)
    run = RunConfig(train=train, teacher=spec("teacher", "debug", train), students=(spec("student", "debug", train),),
                    scratch=False)
    report = reasoning.run_arithmetic(run, tmp_path, log=lambda *_: None)
    assert "scratch" not in report and "scratch" not in report["arithmetic"] and not (tmp_path / "scratch").exists()
