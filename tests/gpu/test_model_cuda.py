"""The model, the distillation head, decoding and the train script on the device.

Each against an independent reference: training curves against the bf16 run of the same model, the fused head
against the textbook loss on full logits, cached and compiled decoding against the full forward and eager
decoding, MTP drafting against greedy, and the training step against CUDA's own sync detector.
"""
import json

import pytest
import torch
import torch.nn.functional as F

from kdarch import CausalLM, LatentKVCache, get_preset
from kdarch.cli import main
from kdarch.distill import TopKTeacher, fused_kd_loss, multi_token_kd_loss
from kdarch.model import generate_speculative
from kdarch.testing import no_host_syncs
from kdarch.train.config import TrainSection
from kdarch.train.loop import train

CYCLE = torch.tensor([3, 17, 42, 99, 7, 250, 64, 5, 128, 31, 77, 200])


def _cycle_data(n: int, t: int) -> torch.Tensor:
    """n sequences of a repeating 12-token cycle at random phases: learnable in a few steps."""
    phase = torch.randint(0, len(CYCLE), (n, 1), generator=torch.Generator().manual_seed(0))
    return CYCLE[(phase + torch.arange(t)) % len(CYCLE)]


def _losses(fp8: bool, dev, sizes, tmp_path) -> torch.Tensor:
    torch.manual_seed(0)
    model = CausalLM(get_preset("debug", fp8=fp8))
    B, T = sizes["batch"]
    cfg = TrainSection(steps=sizes["steps"], batch_size=B, warmup_steps=2, lr=3e-3, log_every=1, progress=False,
                       device=str(dev), dtype="bfloat16")
    res = train(model, cfg, _cycle_data(8 * B, T), tmp_path / ("fp8" if fp8 else "bf16"))
    assert next(model.parameters()).device.type == dev.type
    return torch.tensor([r["lm_loss"] for r in res.rows])


def test_fp8_training_tracks_bf16(dev, sizes, tmp_path):
    """Fp8Linear in every block linear and the FP8 MoE (Triton on CUDA) in a short bf16-autocast run."""
    bf16, fp8 = _losses(False, dev, sizes, tmp_path), _losses(True, dev, sizes, tmp_path)
    assert bf16[-1] < 0.7 * bf16[0]  # the run learns
    dev_max = ((fp8 - bf16).abs() / bf16).max().item()
    print(f"FP8 vs bf16 loss over {len(bf16)} steps: max relative deviation {dev_max:.4f}")
    assert dev_max < 0.05


def _textbook_kd(h, w, labels, teacher, T, alpha):
    s = h.float() @ w.float().T
    soft = F.kl_div(F.log_softmax(s / T, -1), F.log_softmax(teacher.float() / T, -1), log_target=True,
                    reduction="batchmean") * T * T
    return alpha * soft + (1 - alpha) * F.cross_entropy(s, labels)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fused_head_matches_the_textbook_loss(dtype, dev, sizes):
    N, D, V = sizes["head"]
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(N, D, generator=gen).to(dev, dtype).requires_grad_()
    w = (torch.randn(V, D, generator=gen) * D ** -0.5).to(dev, dtype).requires_grad_()
    teacher = (2 * torch.randn(N, V, generator=gen)).to(dev, dtype)
    labels = torch.randint(0, V, (N,), generator=gen).to(dev)
    got = fused_kd_loss(h, w, labels, teacher, kind="forward_kl", temperature=2.0, alpha=0.5)
    g_got = torch.autograd.grad(got, (h, w))
    want = _textbook_kd(h, w, labels, teacher, 2.0, 0.5)
    g_want = torch.autograd.grad(want, (h, w))
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=1e-3)
    torch.testing.assert_close(got.float(), want, **tol)
    for a, b in zip(g_got, g_want):
        assert (a.float() - b.float()).abs().max() <= tol["rtol"] * b.float().abs().max() + tol["atol"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cached_decoding_matches_the_full_forward(dtype, dev, sizes):
    torch.manual_seed(0)
    model = CausalLM(get_preset("debug")).to(dev, dtype).eval()
    x = torch.randint(0, 256, (4, 40), generator=torch.Generator().manual_seed(1)).to(dev)
    with torch.no_grad():
        full = model(x).logits.float()
        cache = LatentKVCache(model.config, 4, 40, dtype=dtype, device=dev)
        steps = [model(x[:, :9], cache=cache).logits]
        steps += [model(x[:, t:t + 1], cache=cache, position_ids=torch.tensor([t], device=dev)).logits
                  for t in range(9, 40)]
    got = torch.cat(steps, 1).float()
    tol = dict(atol=5e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=6e-2, rtol=5e-2)
    torch.testing.assert_close(got, full, **tol)


def test_compiled_static_decoding_gives_eager_tokens(dev, sizes):
    """generate(compile=True): a StaticLatentKVCache and the compiled decode step (mode="reduce-overhead" on
    CUDA: a CUDA graph, no cudagraph skip) give the eager tokens."""
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = CausalLM(get_preset("debug")).to(dev).eval()
    prompts = [[5, 6, 7, 8, 9, 10, 11], [40, 41], [100, 101, 102, 103]]
    n = sizes["decode"]
    assert model.generate(prompts, n, compile=True) == model.generate(prompts, n)
    assert model.generate(prompts, n, compile=True) == model.generate(prompts, n)  # replayed, not recompiled
    assert counters["inductor"]["cudagraph_skips"] == 0


def test_speculative_decoding_equals_greedy(dev, tmp_path, sizes):
    torch.manual_seed(0)
    model = CausalLM(get_preset("debug"))
    B, T = sizes["batch"]
    train(model, TrainSection(steps=30, batch_size=B, warmup_steps=2, lr=1e-2, log_every=10, progress=False,
                              device=str(dev)), _cycle_data(8 * B, T), tmp_path)
    model.eval()
    prompt = CYCLE[:4].tolist()
    spec, stats = generate_speculative(model, prompt, 40)
    assert spec == model.generate([prompt], 40)[0]
    print(f"MTP drafting: acceptance {stats.acceptance:.0%}, {stats.main_steps} main-model steps for 40 tokens")
    assert stats.acceptance > 0.5


def _distill_loss(model, ids, signal):
    out = model(ids, output_mtp_hidden_states=True, return_logits=False)
    return multi_token_kd_loss(out.last_hidden_state, out.mtp_hidden_states, model.head.weight, ids, signal,
                               kind="forward_kl", temperature=2.0, alpha=0.5, mtp_weight=0.3).total


def test_training_steps_never_sync(dev, sizes, value_checks_off):
    """The LM step (labels, MTP, balance loss) and distillation steps (dense and top-k teachers, MTP-aware KD),
    forward and backward, under torch.cuda.set_sync_debug_mode("error") (on the CPU: kdarch.testing's detector)."""
    torch.manual_seed(0)
    model = CausalLM(get_preset("debug", seq_aux_loss_coef=1e-3)).to(dev)
    B, T = sizes["batch"]
    ids = _cycle_data(B, T).to(dev)
    labels = ids.masked_fill(ids == 7, -100)
    teacher = torch.randn(B, T, 256, generator=torch.Generator().manual_seed(2)).to(dev)
    signals = (teacher, TopKTeacher.from_logits(teacher, 8))

    def steps():
        model(ids, labels=labels, return_logits=False).loss.backward()
        for signal in signals:
            _distill_loss(model, ids, signal).backward()
    steps()  # warm-up: lazy CUDA initialisation may sync once
    if dev.type == "cuda":
        torch.cuda.set_sync_debug_mode("error")
        try:
            steps()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    else:
        with no_host_syncs():
            steps()


FAST = ["--model.preset", "debug", "--data.tokenizer", "bytes", "--data.seq_len", "64", "--train.batch_size", "8",
        "--train.log_every", "5", "--train.eval_sequences", "8", "--train.progress", "false"]


@pytest.mark.parametrize("extra", [[], ["--model.fp8", "true", "--train.dtype", "bfloat16"],
                                   ["--train.compile", "true"]], ids=["fp32", "fp8", "compile"])
def test_the_train_script_on_the_device(extra, dev, tmp_path):
    """`kdarch distill` (teacher, student, scratch) on the device: the same command as on the CPU plus a device."""
    out = tmp_path / "run"
    flags = ["--train.device", str(dev), "--train.steps", "10", "--teacher.train.steps", "10", *FAST, *extra]
    assert main(["distill", "--out", str(out), *flags]) == 0
    report = json.loads((out / "report.json").read_text())
    for key in ("teacher", "student", "scratch"):
        assert report[key]["device"].startswith(dev.type), report[key]["device"]
        assert report[key]["eval_loss"] < 5.6  # below uniform over the 256 byte tokens (ln 256 = 5.55) + margin
    if dev.type == "cuda":
        assert report["student"]["peak_memory_mb"] > 0
