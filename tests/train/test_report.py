import json
import math

import pytest
import torch

from kdarch.train.report import add_uncertainty, gap_closed, markdown, write_report


def rows(t, s, b):
    return {"teacher": {"eval_loss": t}, "student": {"eval_loss": s, "perplexity": 2.0}, "scratch": {"eval_loss": b}}


def scored(mean, per_seq_noise, n=64, tokens=100, seed=0):
    """A model row scored on n held-out sequences of `tokens` targets: sequence i's loss is
    common_i + mean + noise, where common_i (how hard sequence i is) is shared by every model."""
    g = torch.Generator().manual_seed(seed)
    common = torch.randn(n, generator=torch.Generator().manual_seed(99)).double()
    loss_i = common * 0.5 + mean + per_seq_noise * torch.randn(n, generator=g).double()
    nll = (loss_i * tokens).tolist()
    return {"eval_loss": sum(nll) / (n * tokens), "per_sequence": {"nll": nll, "tokens": [tokens] * n}}


def test_gap_closed():
    assert gap_closed(rows(2.0, 2.5, 3.0)) == 0.5
    assert gap_closed(rows(2.0, 3.5, 3.0)) == -0.5  # distillation hurt
    assert gap_closed(rows(2.0, 2.0, 3.0)) == 1.0
    assert gap_closed({"teacher": {"eval_loss": 1.0}, "student": {"eval_loss": 2.0}}) is None
    assert gap_closed(rows(3.0, 2.5, 3.0)) is None


@pytest.mark.parametrize("gap, verdict", [(-0.3, "beats"), (0.3, "loses to"), (-0.0014, "no measurable difference")])
def test_paired_interval_and_verdict(gap, verdict):
    report = {"teacher": scored(2.0, 0.05, seed=1), "student": scored(3.0 + gap, 0.05, seed=2),
              "scratch": scored(3.0, 0.05, seed=3)}
    add_uncertainty(report)
    d = report["student_minus_scratch"]
    assert d["verdict"] == verdict
    # against the normal approximation written out here: equal token counts, so the loss is the mean over
    # sequences of their mean losses and the paired difference's s.e. is std(d_i) / sqrt(n)
    n = 64
    d_i = [(a - b) / 100 for a, b in zip(report["student"]["per_sequence"]["nll"],
                                         report["scratch"]["per_sequence"]["nll"])]
    mean = sum(d_i) / n
    se = math.sqrt(sum((x - mean) ** 2 for x in d_i) / (n - 1) / n)
    assert d["eval_loss"] == pytest.approx(mean)
    assert d["ci95"][0] == pytest.approx(mean - 1.96 * se, abs=0.25 * se)
    assert d["ci95"][1] == pytest.approx(mean + 1.96 * se, abs=0.25 * se)
    # each model's own standard error: the spread of sequence losses (shared difficulty included)
    loss_i = [x / 100 for x in report["scratch"]["per_sequence"]["nll"]]
    m = sum(loss_i) / n
    own = math.sqrt(sum((x - m) ** 2 for x in loss_i) / (n - 1) / n)
    assert report["scratch"]["eval_loss_se"] == pytest.approx(own, rel=0.15)


def test_write_report(tmp_path):
    report = {"teacher": {**scored(2.0, 0.05, seed=1), "source": "trained here (4 steps)"},
              "student": {**scored(2.6, 0.05, seed=2), "perplexity": 2.0}, "scratch": scored(3.0, 0.05, seed=3)}
    curves = {"teacher": [{"step": 1, "loss": 5.0, "lm_loss": 4.0, "tokens": 10}],
              "student": [{"step": 1, "loss": 5.0, "hard_ce": 4.5, "tokens": 10}]}
    path = write_report(tmp_path, report, curves, "[train]\nsteps = 4\n")
    saved = json.loads(path.read_text())
    t, s, b = (report[k]["eval_loss"] for k in ("teacher", "student", "scratch"))
    assert saved["gap_closed"] == pytest.approx((b - s) / (b - t))
    assert saved["student_minus_scratch"]["verdict"] == "beats"
    md = (tmp_path / "report.md").read_text()
    assert f"| student | {s:.4f} |" in md and "The distilled student beats" in md and f"{(b - s) / (b - t):.1%}" in md
    assert "Teacher: trained here (4 steps)" in md and (tmp_path / "config.toml").read_text() == "[train]\nsteps = 4\n"
    for f in saved["plots"]:
        assert (tmp_path / f).stat().st_size > 1000


def test_noise_is_not_called_a_win():
    """A 5-step run: student and scratch 0.0014 apart with sequence losses that spread far more."""
    report = {"student": scored(3.0 - 0.0014, 0.2, n=8, seed=2), "scratch": scored(3.0, 0.2, n=8, seed=3),
              "teacher": scored(2.9, 0.2, n=8, seed=1)}
    add_uncertainty(report)
    report["gap_closed"] = gap_closed(report)
    md = markdown(report)
    assert "no measurable difference" in md and "beats" not in md and "gap closed" not in md


def test_an_inherited_student_below_its_teacher_is_said_so():
    report = {"teacher": scored(2.5, 0.05, seed=1), "scratch": scored(3.0, 0.05, seed=3),
              "student": {**scored(2.3, 0.05, seed=2), "init": "teacher blocks [0, 2] of 3"}}
    add_uncertainty(report)
    report["gap_closed"] = gap_closed(report)
    md = markdown(report)
    assert f"= {report['gap_closed']:.1%} (above 100%: the student ends below its teacher's held-out loss)" in md
    assert "The student started from its teacher's weights (teacher blocks [0, 2] of 3; distill.student_init)" in md
