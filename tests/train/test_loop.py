import json
import warnings

import pytest
import torch

from kdarch import CausalLM, get_preset
from kdarch.train.config import TrainSection
from kdarch.train.loop import TrainingError, build_optimizer, train
from kdarch.train.objective import LMObjective, StepLoss


def data(n=64, t=32, v=256, seed=0):
    # A learnable stream: repeated byte patterns, so the loss must fall within a few steps.
    g = torch.Generator().manual_seed(seed)
    base = torch.randint(0, v, (8, t), generator=g)
    return base[torch.randint(0, 8, (n,), generator=g)]


def model(seed=0):
    torch.manual_seed(seed)
    return CausalLM(get_preset("debug"))


def cfg(**kw):
    return TrainSection(**{"steps": 6, "batch_size": 4, "lr": 3e-3, "warmup_steps": 1, "log_every": 1,
                           "checkpoint_every": 0, "progress": False, **kw})


def test_loss_falls_and_metrics_are_written(tmp_path):
    res = train(model(), cfg(steps=12), data(), tmp_path)
    losses = [r["loss"] for r in res.rows]
    assert losses[-1] < losses[0] - 0.5
    assert res.tokens == 12 * 4 * 32 and res.bad_steps == 0
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 13)) and rows == res.rows
    header = (tmp_path / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"step", "loss", "lm_loss", "mtp_loss", "lr", "grad_norm", "tokens_per_s",
            "expert_load_max_over_mean"} <= set(header)
    assert res.checkpoint is not None and res.checkpoint.name == "step_00000012"


def test_warmup_cosine_schedule():
    opt, sched = build_optimizer(list(model().named_parameters()), cfg(steps=10, warmup_steps=2, min_lr_ratio=0.1))
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(1.5e-3) and lrs[1] == pytest.approx(3e-3)
    assert lrs[2:] == sorted(lrs[2:], reverse=True) and lrs[-1] > 3e-4
    assert opt.param_groups[1]["weight_decay"] == 0.0  # norms and embeddings are not decayed
    assert all(p.dim() == 1 or p.dim() >= 2 for p in opt.param_groups[1]["params"])


def test_grad_accumulation_equals_the_big_batch(tmp_path):
    """grad_accum=2 x batch 2 sees the same 4 sequences as batch 4 (same permutation) and normalises over
    all their tokens: the step's (clipped) gradients agree. (Not the weights: Adam's first update is
    lr * g / (|g| + eps), which turns rounding noise on near-zero gradients into +-lr.)"""
    a, b = model(), model()
    ra = train(a, cfg(steps=1, batch_size=4), data(), tmp_path / "a")
    rb = train(b, cfg(steps=1, batch_size=2, grad_accum=2), data(), tmp_path / "b")
    assert ra.rows[0]["loss"] == pytest.approx(rb.rows[0]["loss"], rel=1e-6)
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-7, msg=name)


class FlakyObjective(LMObjective):
    """The LM loss, but NaN on chosen calls."""

    def __init__(self, bad_calls):
        super().__init__()
        self.bad, self.calls = set(bad_calls), 0

    def __call__(self, m, idx, ids, progress):
        self.calls += 1
        res = super().__call__(m, idx, ids, progress)
        return StepLoss(res.loss * float("nan"), res.metrics) if self.calls in self.bad else res


def test_non_finite_steps_are_skipped_then_stop(tmp_path):
    m = model()
    with pytest.warns(UserWarning, match="step 2 skipped \\(non-finite loss"):
        res = train(m, cfg(steps=5), data(), tmp_path / "a", objective=FlakyObjective({2}))
    assert res.bad_steps == 1 and all(torch.isfinite(p).all() for p in m.parameters())
    assert [r["skipped_steps"] for r in res.rows] == [0, 1, 1, 1]  # step 2 was not logged
    with warnings.catch_warnings(), pytest.raises(TrainingError, match=r"3 steps skipped .*max_bad_steps=2"):
        warnings.simplefilter("ignore")
        train(model(), cfg(steps=6, max_bad_steps=2), data(), tmp_path / "b", objective=FlakyObjective({1, 2, 3}))


class DiesAt(LMObjective):
    """The LM objective, until its `n`-th call: then the process 'dies' (an exception out of train)."""

    def __init__(self, n):
        super().__init__()
        self.calls, self.n = 0, n

    def __call__(self, *args):
        self.calls += 1
        if self.calls == self.n:
            raise RuntimeError("died")
        return super().__call__(*args)


def test_resume_in_process_reproduces_the_losses(tmp_path):
    straight = train(model(), cfg(steps=8), data(), tmp_path / "a")
    assert [p.name for p in (tmp_path / "a" / "checkpoints").iterdir()] == ["step_00000008"]  # done: final only
    with pytest.raises(RuntimeError, match="died"):  # dies in step 7, after step 6's checkpoint
        train(model(), cfg(steps=8, checkpoint_every=3), data(), tmp_path / "b", objective=DiesAt(7))
    resumed = train(model(seed=1), cfg(steps=8, checkpoint_every=3), data(), tmp_path / "b", resume=True)
    assert [r["loss"] for r in resumed.rows] == [r["loss"] for r in straight.rows]
    assert [r["step"] for r in resumed.rows] == list(range(1, 9))


def test_resume_falls_back_to_the_newest_intact_checkpoint(tmp_path):
    straight = train(model(), cfg(steps=8), data(), tmp_path / "a")
    with pytest.raises(RuntimeError, match="died"):
        train(model(), cfg(steps=8, checkpoint_every=3), data(), tmp_path / "b", objective=DiesAt(7))
    bad = tmp_path / "b" / "checkpoints" / "step_00000006" / "optimizer.safetensors"
    raw = bytearray(bad.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    bad.write_bytes(bytes(raw))
    with pytest.warns(UserWarning, match=r"step_00000006 is unusable .*corrupt.*resuming from step_00000003 instead"):
        resumed = train(model(seed=1), cfg(steps=8, checkpoint_every=3), data(), tmp_path / "b", resume=True)
    assert [r["loss"] for r in resumed.rows] == [r["loss"] for r in straight.rows]
    assert not (tmp_path / "b" / "checkpoints" / "step_00000006").exists()  # replaced by the rerun's own


def test_padding_is_never_a_target():
    m, pad = model(), 255
    ids = data(n=3, t=10)
    ids[0, 6:] = pad
    ids[2, 3:] = pad
    obj = LMObjective(pad_id=pad)
    assert obj.target_tokens(ids) == 5 + 9 + 2 and LMObjective().target_tokens(ids) == 27
    manual = ids.masked_fill(ids == pad, -100)
    torch.testing.assert_close(obj(m, None, ids, 0.0).loss, m(ids, labels=manual).loss)


def test_an_oversubscribed_machine_is_named_once(monkeypatch):
    from kdarch.train import metrics
    monkeypatch.setattr(metrics, "_LOAD_WARNED", False)
    monkeypatch.setattr(metrics.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(metrics.os, "getloadavg", lambda: (2.4, 2.0, 2.0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        metrics.warn_if_oversubscribed(2)  # our own two threads: no warning
    monkeypatch.setattr(metrics.os, "getloadavg", lambda: (9.0, 8.0, 7.0))
    with pytest.warns(UserWarning, match=r"oversubscribed: load average 9.0 on 2 cores.*--train.threads"):
        metrics.warn_if_oversubscribed(2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        metrics.warn_if_oversubscribed(2)  # once per process


def test_compile_switch_trains_like_eager(tmp_path):
    """train.compile compiles each block (inductor: C++ on the CPU); the losses follow the eager run's."""
    eager = train(model(), cfg(steps=3), data(), tmp_path / "eager")
    compiled_model = model()
    compiled = train(compiled_model, cfg(steps=3, compile=True), data(), tmp_path / "compiled")
    assert all(hasattr(b, "_compiled_call_impl") and b._compiled_call_impl is not None for b in compiled_model.layers)
    for a, b in zip(compiled.rows, eager.rows):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
