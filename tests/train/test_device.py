"""Devices in the train script (exercised here on the CPU through the same code a CUDA run takes), and a
training step with no host sync: it compiles whole (fullgraph=True, no graph break) and matches eager."""
import pytest
import torch

from kdarch import CausalLM, get_preset
from kdarch.checks import ConfigError
from kdarch.distill import TopKTeacher, multi_token_kd_loss
from kdarch.testing import HostSyncError, no_host_syncs
from kdarch.train.config import TrainSection
from kdarch.train.device import PeakMemory, check_device, resolve_device, to_device
from kdarch.train.loop import train


def test_device_spellings_and_availability():
    for ok in ("auto", "cpu"):
        check_device(ok, "train.device")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ConfigError,
                       match=r"train.device: expected \"auto\", \"cpu\", \"cuda\" or \"cuda:N\", got 'gpu'"):
        check_device("gpu", "train.device")
    with pytest.raises(ConfigError, match="train.device"):
        TrainSection(device="cuda:x")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match=r"train.device: expected a device this machine has \(no CUDA device"):
            check_device("cuda", "train.device")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    with pytest.raises(ConfigError, match="a device this machine has"):
        check_device(f"cuda:{count}", "train.device")


def test_batches_and_peak_memory_on_the_cpu():
    ids = torch.arange(6).view(2, 3)
    assert torch.equal(to_device(ids, torch.device("cpu")), ids)
    with PeakMemory("cpu") as mem:
        x = torch.ones(2**22)  # 16 MiB
        del x
    assert mem.peak_mb > 16


def test_training_on_an_explicit_device(tmp_path):
    torch.manual_seed(0)
    model = CausalLM(get_preset("debug"))
    data = torch.randint(0, 256, (16, 16), generator=torch.Generator().manual_seed(0))
    cfg = TrainSection(steps=3, batch_size=4, warmup_steps=1, log_every=1, progress=False, device="cpu")
    res = train(model, cfg, data, tmp_path)
    assert [r["step"] for r in res.rows] == [1, 2, 3] and all(isinstance(r["lm_loss"], float) for r in res.rows)
    assert next(model.parameters()).device.type == "cpu"


def test_a_training_step_compiles_whole_and_matches_eager():
    """Forward with labels (main + MTP + balance loss) and backward: no value is read back from the device,
    so dynamo traces it as one graph (a host sync would be a graph break, an error under fullgraph)."""
    torch.manual_seed(0)
    model = CausalLM(get_preset("debug", seq_aux_loss_coef=1e-3))
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))

    def loss_fn(ids):
        return model(ids, labels=ids, return_logits=False).loss

    params = [p for p in model.parameters()]
    eager = loss_fn(ids)
    want = torch.autograd.grad(eager, params, allow_unused=True)
    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")(ids)
    torch.testing.assert_close(compiled, eager)
    got = torch.autograd.grad(compiled, params, allow_unused=True)
    assert sum(g is not None for g in want) > 20
    for g, w in zip(got, want):
        assert (g is None) == (w is None)
        if w is not None:
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)


# --- no host syncs ---------------------------------------------------------------------------------------------


def test_the_sync_detector_catches_reads_and_value_shapes():
    x = torch.arange(6.0)
    for read in (lambda: x.sum().item(), lambda: int(x.max()), lambda: bool(x.any()), lambda: x.tolist(),
                 lambda: x[x > 2], lambda: x.nonzero(), lambda: torch.bincount(x.long())):
        with pytest.raises(HostSyncError), no_host_syncs():
            read()
    with no_host_syncs():  # fixed-shape work on the device is fine
        (x * 2).softmax(0).scatter_add(0, torch.tensor([0, 0]), torch.ones(2))


def _distill_loss(model, ids, signal):
    out = model(ids, output_mtp_hidden_states=True, return_logits=False)
    return multi_token_kd_loss(out.last_hidden_state, out.mtp_hidden_states, model.head.weight, ids, signal,
                               kind="forward_kl", temperature=2.0, alpha=0.5, mtp_weight=0.3).total


def test_training_steps_read_nothing_back(value_checks_off):
    """Forward with labels + MTP + balance loss, and a distillation step against dense and top-k teachers with
    MTP-aware KD, each with its backward: not one value read back, not one value-dependent shape."""
    torch.manual_seed(0)
    model = CausalLM(get_preset("debug", seq_aux_loss_coef=1e-3))
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    ids[0, -3:] = 7
    labels = ids.masked_fill(ids == 7, -100)  # ignored targets: masked, never planned around on the host
    teacher = torch.randn(2, 16, 256, generator=torch.Generator().manual_seed(2))
    with no_host_syncs():
        model(ids, labels=labels, return_logits=False).loss.backward()
        for signal in (teacher, TopKTeacher.from_logits(teacher, 8)):
            _distill_loss(model, ids, signal).backward()


@pytest.mark.parametrize("signal", ["dense", "topk"])
def test_a_distillation_step_compiles_whole_and_matches_eager(signal):
    torch.manual_seed(0)
    model = CausalLM(get_preset("debug"))
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    t = torch.randn(2, 16, 256, generator=torch.Generator().manual_seed(2))
    sig = t if signal == "dense" else TopKTeacher.from_logits(t, 8)
    params = list(model.parameters())
    eager = _distill_loss(model, ids, sig)
    want = torch.autograd.grad(eager, params, allow_unused=True)
    compiled = torch.compile(_distill_loss, fullgraph=True, backend="aot_eager")(model, ids, sig)
    torch.testing.assert_close(compiled, eager)
    for g, w in zip(torch.autograd.grad(compiled, params, allow_unused=True), want):
        assert (g is None) == (w is None)
        if w is not None:
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("amx, avx512_bf16, want", [(False, False, torch.float32), (True, False, torch.bfloat16),
                                                    (False, True, torch.bfloat16)])
def test_auto_dtype_is_bfloat16_only_where_matmuls_run_natively_in_it(monkeypatch, amx, avx512_bf16, want):
    from kdarch.train.device import resolve_dtype
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    assert resolve_dtype("auto", torch.device("cpu")) == want
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16  # a device object only: nothing allocated
    assert resolve_dtype("float32", torch.device("cuda")) == torch.float32
    assert resolve_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16
