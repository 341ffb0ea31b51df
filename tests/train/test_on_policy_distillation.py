"""On-policy distillation in the train script's objective: sampled steps learn the teacher on the student's own
tokens only, off-policy steps are unchanged, and runs report what the rollouts cost."""
import json

import pytest
import torch

from kdarch import CausalLM, get_preset
from kdarch.distill import CachedTeacher, ModelTeacher, kd_loss
from kdarch.train import reasoning
from kdarch.train.arithmetic import solution
from kdarch.train.config import DistillSection, RunConfig, StageSpec, TrainSection
from kdarch.train.objective import DistillObjective
from kdarch.train.tokenizer import ByteTokenizer


def _models():
    torch.manual_seed(0)
    teacher = CausalLM(get_preset("debug", hidden_size=96, n_heads=6)).eval()
    student = CausalLM(get_preset("debug"))
    return ModelTeacher(teacher), student


def _greedy(model, prompt_BP: torch.Tensor, n: int) -> torch.Tensor:
    """Greedy continuation by full forwards (no cache)."""
    seq = prompt_BP
    with torch.no_grad():
        for _ in range(n):
            seq = torch.cat([seq, model(seq).logits[:, -1:].argmax(-1)], 1)
    return seq


def _kd_reference(student, teacher, ids_BT, labels_BT, **kw):
    """The main head's KD loss from materialised logits: row j against token j + 1."""
    s = student(ids_BT).logits[:, :-1]
    with torch.no_grad():
        t = teacher.model(ids_BT).logits[:, :-1]
    return kd_loss(s, t, labels_BT[:, 1:], **kw)


@pytest.mark.parametrize("kind", ["reverse_kl", "forward_kl", "jsd"])
def test_a_sampled_step_distils_on_the_students_own_tokens_only(kind):
    teacher, student = _models()
    cfg = DistillSection(on_policy=1.0, rollout_tokens=5, rollout_temperature=0.0, mtp=False, kind=kind,
                         alpha="constant:0.5")
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
    obj = DistillObjective(teacher, student, cfg, total_steps=4, eos_token_id=-1)
    got = obj(student, torch.arange(2), ids, 0.0)
    seq = _greedy(student.eval(), ids[:, :7], 5)  # the prompt is all but the last rollout_tokens
    labels = seq.clone()
    labels[:, :7] = -100
    want = _kd_reference(student, teacher, seq, labels, kind=kind, alpha=1.0)  # no hard term on own samples
    assert got.loss.item() == pytest.approx(want.item(), rel=1e-5)
    assert got.metrics["alpha"] == 1.0 and got.metrics["on_policy"] == 1.0
    got.loss.backward()
    assert all(p.grad is not None for p in student.head.parameters())
    assert obj.rollouts.tokens == 10 and obj.state_dict()["rollouts"]["sequences"] == 2


def test_lambda_zero_is_off_policy_distillation_exactly():
    teacher, student = _models()
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(2))
    for cfg in (DistillSection(mtp=False), DistillSection(mtp=False, on_policy=0.0, rollout_tokens=3)):
        got = DistillObjective(teacher, student, cfg, total_steps=4)(student, torch.arange(2), ids, 0.5)
        want = _kd_reference(student, teacher, ids, ids, kind="forward_kl", alpha=0.9)
        assert got.loss.item() == pytest.approx(want.item(), rel=1e-5)
        assert "on_policy" not in got.metrics


def test_half_the_steps_sample_and_resume_keeps_the_counts():
    teacher, student = _models()
    cfg = DistillSection(on_policy=0.5, rollout_tokens=3)
    ids = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(3))
    obj = DistillObjective(teacher, student, cfg, total_steps=4, eos_token_id=-1)
    flags = [obj(student, torch.arange(2), ids, s / 4).metrics["on_policy"] for s in range(4)]
    assert flags == [0.0, 1.0, 0.0, 1.0]
    again = DistillObjective(teacher, student, cfg, total_steps=4)
    again.load_state_dict(obj.state_dict())
    assert again.rollouts == obj.rollouts and obj.rollouts.rollouts == 2


def test_sampled_steps_need_a_model_teacher(tmp_path):
    _, student = _models()
    cache = object.__new__(CachedTeacher)  # the type is what is refused, before any cache is read
    with pytest.raises(ValueError, match="distill.on_policy: expected a model teacher"):
        DistillObjective(cache, student, DistillSection(on_policy=0.5), total_steps=4)


@pytest.mark.parametrize("field, value, expected", [("on_policy", 2.0, r"a number in \[0, 1\]"),
                                                    ("rollout_tokens", 0, "an int >= 1"),
                                                    ("rollout_temperature", -1.0, "a number >= 0")])
def test_bad_on_policy_settings_are_named(field, value, expected):
    from kdarch.config import ConfigError
    with pytest.raises(ConfigError, match=f"^distill.{field}: expected {expected}"):
        DistillSection(**{field: value})


def test_arithmetic_rollouts_answer_each_question_and_the_report_says_so(tmp_path, monkeypatch):
    tok = ByteTokenizer()
    rows = reasoning.rows(["Q: 1+2\nA: 3$", "Q: 4*5-6\n20-6=14\nA: 14$"], tok)
    assert reasoning.question_lengths(tok)(rows) == [len("Q: 1+2\n"), len("Q: 4*5-6\n")]

    monkeypatch.setattr(reasoning, "solve", lambda model, problems, tok, batch=100: [solution(p) for p in problems])
    monkeypatch.setattr(reasoning, "N_CURATE", 8)
    train = TrainSection(steps=2, batch_size=4, progress=False, eval_sequences=4, warmup_steps=1)
    stage = lambda name, **o: StageSpec(name, {"preset": "debug", **o}, {})  # noqa: E731
    run = RunConfig(train=train, teacher=stage("teacher"), students=(stage("student"),), scratch=False,
                    distill=DistillSection(on_policy=0.5, rollout_tokens=8, kind="reverse_kl"))
    report = reasoning.run_arithmetic(run, tmp_path, log=lambda *_: None)
    figures = report["student"]["on_policy"]
    assert (figures["fraction"], figures["rollouts"], figures["sequences"]) == (0.5, 1, 4)
    # each of the 4 rows samples 1..8 tokens (it may end at END early)
    assert 4 <= figures["tokens"] <= 32 and figures["mean_sampled_tokens"] == figures["tokens"] / 4
    assert figures["seconds"] > 0
    assert json.loads((tmp_path / "report.json").read_text())["student"]["on_policy"]["tokens"] == figures["tokens"]


def test_rollouts_that_end_early_are_averaged_over_the_steps_sampled_tokens():
    """Greedy rollouts, one row cut at its end token after 2 tokens: two micro-batches, each divided by the step's
    sampled tokens, give the KD mean over all sampled tokens of the batch, computed here from materialised logits."""
    teacher, student = _models()
    cfg = DistillSection(on_policy=1.0, rollout_tokens=6, rollout_temperature=0.0, mtp=False, kind="reverse_kl")
    ids = torch.randint(1, 256, (4, 12), generator=torch.Generator().manual_seed(4))
    P = 12 - 6
    seq = _greedy(student.eval(), ids[:, :P], 6)
    student.train()
    eos = int(seq[0, P + 1])  # row 0 ends at its second sampled token
    ends = [next((j for j in range(P, 12) if seq[i, j] == eos), 11) for i in range(4)]
    assert ends[0] == P + 1 and max(ends) == 11  # one row ends early, another runs its full length
    labels = seq.clone()
    for i, e in enumerate(ends):
        seq[i, e + 1:] = 0  # what the rollout pads with
        labels[i, :P], labels[i, e + 1:] = -100, -100
    want = _kd_reference(student, teacher, seq, labels, kind="reverse_kl", alpha=1.0)
    obj = DistillObjective(teacher, student, cfg, total_steps=4, eos_token_id=eos)
    parts = [obj.prepare(student, torch.tensor(r), ids[list(r)], 0.0) for r in ((0, 1), (2, 3))]
    step_C = torch.stack([b.counts_C for b in parts]).sum(0)
    assert int(step_C[1]) == sum(e - P + 1 for e in ends)  # the sampled tokens of every row
    got = 0.0
    for b in parts:
        b.step_counts_C = step_C
        got += obj(student, b.indices_B, b, 0.0).loss.detach()
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    halves = sum(obj(student, b.indices_B, b.ids_BT, 0.0).loss.detach() / 2 for b in parts)  # each its own mean
    assert halves.item() != pytest.approx(want.item(), rel=2e-4)  # 20x the tolerance above
