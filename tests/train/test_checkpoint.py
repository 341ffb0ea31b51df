import json
import math
import os
import pickle
import random

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import kdarch
from kdarch import CausalLM, get_preset
from kdarch.train.checkpoint import CorruptCheckpointError, latest_checkpoint, load_checkpoint, save_checkpoint

WARMUP, TOTAL = 2, 10


def warmup_cosine(i: int) -> float:
    return (i + 1) / WARMUP if i < WARMUP else 0.5 * (1 + math.cos(math.pi * min(1.0, (i - WARMUP) / (TOTAL - WARMUP))))


def make_run(seed: int, **cfg_changes):
    """Model, feature projector, AdamW over both, warm-up + cosine schedule, router-bias updates after each step."""
    torch.manual_seed(seed)
    model = CausalLM(get_preset("debug", **cfg_changes))
    proj = nn.Linear(model.config.hidden_size, 16)
    opt = torch.optim.AdamW([{"params": model.parameters()}, {"params": proj.parameters(), "weight_decay": 0.0}],
                            lr=3e-3, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine)
    model.attach_bias_update(opt)
    return model, proj, opt, sched


def train(model, proj, opt, sched, n: int) -> list[float]:
    """n steps on batches drawn from the torch RNG (lengths from Python's), LM loss + a feature term."""
    losses = []
    for _ in range(n):
        ids = torch.randint(0, model.config.vocab_size, (2, random.randint(8, 12)))
        out = model(ids, labels=ids, output_hidden_states=True, return_logits=False)
        loss = out.loss + 0.1 * proj(out.hidden_states[1]).pow(2).mean()
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)


def assert_same_run(a, b):
    (ma, pa, oa, sa), (mb, pb, ob, sb) = a, b
    for (name, x), (_, y) in zip(list(ma.state_dict().items()) + list(pa.state_dict().items()),
                                 list(mb.state_dict().items()) + list(pb.state_dict().items())):
        assert torch.equal(x, y), name
    sda, sdb = oa.state_dict(), ob.state_dict()
    assert sda["param_groups"] == sdb["param_groups"]
    assert sda["state"].keys() == sdb["state"].keys()
    for i in sda["state"]:
        for k, v in sda["state"][i].items():
            assert v.dtype == sdb["state"][i][k].dtype and torch.equal(v, sdb["state"][i][k]), (i, k)
    assert sa.state_dict() == sb.state_dict() and sa.get_last_lr() == sb.get_last_lr()


def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    seed_all(0)
    straight = make_run(0)
    losses = train(*straight, 6)

    seed_all(0)
    first = make_run(0)
    head = train(*first, 3)
    save_checkpoint(tmp_path, 3, model=first[0], optimizer=first[2], scheduler=first[3],
                    modules={"projector": first[1]}, state={"seen": 3})
    seed_all(1)  # the killed process is gone: different init, different RNG position
    model, proj, opt, sched = resumed = make_run(1)
    assert not torch.equal(model.embed.weight, first[0].embed.weight)
    info = load_checkpoint(latest_checkpoint(tmp_path), model=model, optimizer=opt, scheduler=sched,
                           modules={"projector": proj})
    assert info == {"step": 3, "state": {"seen": 3}}
    assert any(m.gate.bias.abs().sum() > 0 for m in model.moe_layers())  # the router bias came back
    tail = train(*resumed, 3)
    assert head + tail == losses
    assert_same_run(straight, resumed)


@pytest.mark.parametrize("tied", [False, True])
def test_round_trip_restores_everything(tmp_path, tied):
    seed_all(0)
    src = make_run(0, tie_word_embeddings=tied)
    train(*src, 2)
    for m in src[0].moe_layers():
        m.gate.bias.normal_()
    state = {"data": {"epoch": 1, "offset": 40}, "pair": (1, 2.5), "by_id": {3: "x", 4: None},
             "t": torch.arange(3), "__tensor__": [True, float("inf")]}
    path = save_checkpoint(tmp_path, 2, model=src[0], optimizer=src[2], scheduler=src[3],
                           modules={"projector": src[1]}, state=state)
    assert path == tmp_path / "checkpoints" / "step_00000002"
    expected_rand, expected_random = torch.rand(4), random.random()

    seed_all(5)
    dst = make_run(3, tie_word_embeddings=tied)
    info = load_checkpoint(path, model=dst[0], optimizer=dst[2], scheduler=dst[3], modules={"projector": dst[1]})
    assert torch.equal(torch.rand(4), expected_rand) and random.random() == expected_random
    assert_same_run(src, dst)
    assert isinstance(dst[2].param_groups[0]["betas"], tuple) and dst[3].get_last_lr() == src[3].get_last_lr()
    got = info["state"]
    assert torch.equal(got.pop("t"), state["t"]) and got == {k: v for k, v in state.items() if k != "t"}
    assert isinstance(got["pair"], tuple) and list(got["by_id"]) == [3, 4]
    if tied:
        assert dst[0].head.weight is dst[0].embed.weight
    # the checkpoint is also a model directory, and the optimiser tensors carry their param index in the name
    loaded = kdarch.from_pretrained(path)
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, src[0].state_dict()[k]), k
    names = load_file(str(path / "optimizer.safetensors")).keys()
    assert {"state.0.exp_avg", "state.0.exp_avg_sq", "state.0.step"} <= names
    n_params = sum(len(g["params"]) for g in src[2].param_groups)
    groups = json.loads((path / "optimizer.json").read_text())["param_groups"]
    assert groups[1]["params"] == [n_params - 2, n_params - 1] and groups[1]["betas"] == {"__tuple__": [0.9, 0.95]}


def test_restore_rng_false_leaves_generators_alone(tmp_path):
    model, proj, opt, sched = make_run(0)
    save_checkpoint(tmp_path, 0, model=model, optimizer=opt)
    seed_all(7)
    load_checkpoint(latest_checkpoint(tmp_path), model=model, restore_rng=False)
    after = torch.rand(3)
    seed_all(7)
    assert torch.equal(after, torch.rand(3))


def test_keep_last_and_resaving(tmp_path):
    model, proj, opt, sched = make_run(0)
    for step in range(1, 6):
        save_checkpoint(tmp_path, step, model=model, optimizer=opt, keep_last=2)
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step_00000004", "step_00000005"]
    save_checkpoint(tmp_path, 3, model=model, optimizer=opt, keep_last=2)  # an older step is never its own victim
    assert sorted(p.name for p in root.iterdir()) == ["step_00000003", "step_00000005"]
    save_checkpoint(tmp_path, 5, model=model, optimizer=opt, state={"v": 2}, keep_last=None)  # replaces step 5
    assert load_checkpoint(root / "step_00000005", model=model)["state"] == {"v": 2}
    assert sorted(p.name for p in root.iterdir()) == ["step_00000003", "step_00000005"]
    with pytest.raises(ValueError, match="keep_last: expected an int >= 1"):
        save_checkpoint(tmp_path, 6, model=model, optimizer=opt, keep_last=0)
    with pytest.raises(ValueError, match="step: expected an int >= 0"):
        save_checkpoint(tmp_path, -1, model=model, optimizer=opt)
    with pytest.raises(TypeError, match="checkpoint: s is a set; expected JSON values"):
        save_checkpoint(tmp_path, 6, model=model, optimizer=opt, state={"s": {1, 2}})
    with pytest.raises(TypeError, match="model: expected a kdarch.CausalLM"):
        save_checkpoint(tmp_path, 6, model=proj, optimizer=opt)
    assert latest_checkpoint(tmp_path) == root / "step_00000005"  # failed saves left nothing behind
    assert sorted(p.name for p in root.iterdir()) == ["step_00000003", "step_00000005"]


def test_latest_ignores_temp_and_incomplete_dirs(tmp_path, monkeypatch):
    assert latest_checkpoint(tmp_path) is None
    model, proj, opt, sched = make_run(0)
    save_checkpoint(tmp_path, 1, model=model, optimizer=opt)
    root = tmp_path / "checkpoints"
    (root / ".step_00000009.abc.tmp").mkdir()  # a save killed before its rename
    (root / ".step_00000009.abc.tmp" / "model.safetensors").write_bytes(b"partial")
    incomplete = root / "step_00000008"  # e.g. copied by hand without its manifest
    incomplete.mkdir()
    (incomplete / "config.json").write_text("{}")
    truncated = root / "step_00000007"  # manifest present, a listed file gone
    truncated.mkdir()
    (truncated / "manifest.json").write_text(json.dumps({"step": 7, "files": {"model.safetensors": "0"}}))
    assert latest_checkpoint(tmp_path) == root / "step_00000001"

    real_replace = os.replace

    def crash(src, dst):
        if os.path.isdir(src):  # the final rename of the checkpoint directory: every file was written
            raise RuntimeError("disk full")
        real_replace(src, dst)
    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        save_checkpoint(tmp_path, 2, model=model, optimizer=opt)
    monkeypatch.undo()
    assert latest_checkpoint(tmp_path) == root / "step_00000001"
    assert not (root / "step_00000002").exists()
    save_checkpoint(tmp_path, 2, model=model, optimizer=opt)  # also sweeps the leftover temp directory
    assert sorted(p.name for p in root.iterdir()) == ["step_00000001", "step_00000002", "step_00000007",
                                                      "step_00000008"]


@pytest.fixture
def saved(tmp_path):
    model, proj, opt, sched = run = make_run(0)
    train(*run, 1)
    path = save_checkpoint(tmp_path, 1, model=model, optimizer=opt, scheduler=sched, modules={"projector": proj})
    return path, run


@pytest.mark.parametrize("file", ["optimizer.safetensors", "model.safetensors", "rng.json", "config.json"])
def test_corrupt_or_missing_file_is_named(saved, file):
    path, (model, proj, opt, sched) = saved
    data = bytearray((path / file).read_bytes())
    data[len(data) // 2] ^= 0x01
    (path / file).write_bytes(bytes(data))
    before = model.embed.weight.clone()
    with pytest.raises(ValueError, match=f"{file}: corrupt"):
        load_checkpoint(path, model=model, optimizer=opt, scheduler=sched, modules={"projector": proj})
    assert torch.equal(model.embed.weight, before)  # nothing loaded
    (path / file).unlink()
    with pytest.raises(CorruptCheckpointError, match=f"{file}: missing"):
        load_checkpoint(path, model=model, optimizer=opt, scheduler=sched, modules={"projector": proj})


def test_manifest_problems(saved):
    path, (model, proj, opt, sched) = saved
    manifest = json.loads((path / "manifest.json").read_text())
    (path / "manifest.json").write_text(json.dumps({**manifest, "format_version": 99}))
    with pytest.raises(ValueError, match="format_version: expected 2 .*got 99"):
        load_checkpoint(path, model=model)
    del manifest["files"]["rng.json"]
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="lists no rng.json"):
        load_checkpoint(path, model=model)
    (path / "manifest.json").unlink()
    with pytest.raises(FileNotFoundError, match="has no manifest.json"):
        load_checkpoint(path, model=model)


def test_refuses_mismatches(saved):
    path, (model, proj, opt, sched) = saved
    other = CausalLM(get_preset("debug", mtp_loss_weight=0.5, bias_update_speed=0.01))  # same shapes
    with pytest.raises(ValueError, match=r"different model config; bias_update_speed: checkpoint 0.001, model 0.01; "
                                         r"mtp_loss_weight: checkpoint 0.3, model 0.5$"):
        load_checkpoint(path, model=other)
    model_only = torch.optim.AdamW(model.parameters())
    with pytest.raises(ValueError, match=r"param groups of \[\d+, 2\] params, the given one has \[\d+\]"):
        load_checkpoint(path, model=model, optimizer=model_only, modules={"projector": proj})
    wide = nn.Linear(model.config.hidden_size, 32)
    wide_opt = torch.optim.AdamW([{"params": model.parameters()}, {"params": wide.parameters()}])
    with pytest.raises(ValueError, match=r"group 1 param 0 has shape \(16, 64\) in the checkpoint, \(32, 64\) given"):
        load_checkpoint(path, model=model, optimizer=wide_opt, modules={"projector": wide})
    with pytest.raises(ValueError, match=r"modules.safetensors \[projector\]: tensor weight: expected shape "
                                         r"\(32, 64\), got \(16, 64\)"):
        load_checkpoint(path, model=model, modules={"projector": wide})
    with pytest.raises(ValueError, match=r"holds the modules \['projector'\], given \['proj'\]"):
        load_checkpoint(path, model=model, optimizer=opt, modules={"proj": proj})
    with pytest.raises(ValueError, match="holds AdamW state, given SGD"):
        load_checkpoint(path, model=model, optimizer=torch.optim.SGD(model.parameters()), modules={"projector": proj})
    step_lr = torch.optim.lr_scheduler.StepLR(opt, 2)
    with pytest.raises(ValueError, match="scheduler state 'LambdaLR', given StepLR"):
        load_checkpoint(path, model=model, scheduler=step_lr)


def test_no_pickle(tmp_path, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("pickle used")
    for name in ("dump", "dumps", "load", "loads"):
        monkeypatch.setattr(pickle, name, forbidden)
    monkeypatch.setattr(torch, "save", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    model, proj, opt, sched = run = make_run(0)
    train(*run, 1)
    path = save_checkpoint(tmp_path, 1, model=model, optimizer=opt, scheduler=sched, modules={"projector": proj})
    load_checkpoint(path, model=model, optimizer=opt, scheduler=sched, modules={"projector": proj})
    assert {p.suffix for p in path.iterdir()} == {".json", ".safetensors"}
