import json

import pytest

from kdarch.train.report import gap_closed, markdown, write_report


def rows(t, s, b):
    return {"teacher": {"eval_loss": t}, "student": {"eval_loss": s, "perplexity": 2.0}, "scratch": {"eval_loss": b}}


def test_gap_closed():
    assert gap_closed(rows(2.0, 2.5, 3.0)) == 0.5
    assert gap_closed(rows(2.0, 3.5, 3.0)) == -0.5  # distillation hurt
    assert gap_closed(rows(2.0, 2.0, 3.0)) == 1.0
    assert gap_closed({"teacher": {"eval_loss": 1.0}, "student": {"eval_loss": 2.0}}) is None
    assert gap_closed(rows(3.0, 2.5, 3.0)) is None


def test_write_report(tmp_path):
    report = rows(2.0, 2.6, 3.0)
    curves = {"teacher": [{"step": 1, "loss": 5.0, "lm_loss": 4.0, "tokens": 10}],
              "student": [{"step": 1, "loss": 5.0, "hard_ce": 4.5, "tokens": 10}]}
    path = write_report(tmp_path, report, curves)
    saved = json.loads(path.read_text())
    assert saved["gap_closed"] == pytest.approx(0.4) and saved["student_beats_scratch"] is True
    md = (tmp_path / "report.md").read_text()
    assert "| student | 2.6000 | 2.00 |" in md and "gap closed" in md and "40.0%" in md
    for f in saved["plots"]:
        assert (tmp_path / f).stat().st_size > 1000
    worse = rows(2.0, 3.2, 3.0)
    assert "does not beat" in markdown({**worse, "gap_closed": gap_closed(worse)})
