"""The model-level FP8 switch: block linears and experts in FP8, the rest in high precision."""
import pytest
import torch

from kdarch import CausalLM, get_preset, ops
from kdarch.kernels.fp8_ref import dequantize_ref, quantize_act_ref, quantize_weight_ref, rel_err
from kdarch.kernels.moe_ref import moe_ffn_ref
from kdarch.ops.fp8 import Fp8Linear


def test_switch_puts_block_linears_in_fp8_and_keeps_the_rest():
    model = CausalLM(get_preset("debug", fp8=True))
    fp8 = {n for n, m in model.named_modules() if isinstance(m, Fp8Linear)}
    assert "layers.0.attn.wq_a" in fp8 and "layers.0.ffn.w_gate_up" in fp8 and "layers.1.ffn.shared.w_down" in fp8
    assert "mtp.0.eh_proj" in fp8
    assert not any(n.endswith(("head", "wkv_b")) for n in fp8)
    assert not isinstance(model.head, Fp8Linear)
    # same parameters as the high-precision model, so checkpoints are interchangeable
    plain = CausalLM(get_preset("debug"))
    assert {k: v.shape for k, v in plain.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}


def _fake_quant_moe(x, ids, w, wgu, wd):
    """The expert FFN with every GEMM operand rounded to e4m3 the way the FP8 path does it (activations in
    1x128 row tiles with the routing weight folded in before the down GEMM, weights in 128x128 blocks)."""
    def fq_act(a):
        return dequantize_ref(*quantize_act_ref(a))

    def fq_w(m):
        return dequantize_ref(*quantize_weight_ref(m))
    out = torch.zeros_like(x)
    I = wd.shape[-1]
    for e in range(wgu.shape[0]):
        t, k = (ids == e).nonzero(as_tuple=True)
        h = fq_act(x[t]) @ fq_w(wgu[e]).T
        act = torch.nn.functional.silu(h[:, :I]) * h[:, I:] * w[t, k, None]
        out = out.index_add(0, t, fq_act(act) @ fq_w(wd[e]).T)
    return out


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fp8_experts_match_reference_within_fp8_error(backend):
    """moe_ffn(fp8=True) on each backend of the registry op "moe_ffn_fp8" (Triton under the interpreter)."""
    torch.manual_seed(0)
    T, H, I, E, K = 64, 128, 64, 4, 2
    x = torch.randn(T, H, requires_grad=True)
    ids = torch.stack([torch.randperm(E)[:K] for _ in range(T)])
    w = torch.rand(T, K, requires_grad=True)
    wgu = (torch.randn(E, 2 * I, H) / H ** 0.5).requires_grad_()
    wd = (torch.randn(E, H, I) / I ** 0.5).requires_grad_()
    got = ops.moe_ffn(x, ids, w, wgu, wd, backend=backend, fp8=True)
    g = torch.randn_like(got)
    grads = torch.autograd.grad(got, (x, w, wgu, wd), g)
    with torch.no_grad():  # exactly the quantised computation, up to fp32 accumulation order
        assert rel_err(got, _fake_quant_moe(x, ids, w, wgu, wd)) < 1e-5
    ref = moe_ffn_ref(x, ids, w, wgu, wd)
    ref_grads = torch.autograd.grad(ref, (x, w, wgu, wd), g)
    # vs the unquantised fp32 op: two chained e4m3 GEMMs at ~3.7% each (random normal data)
    assert rel_err(got, ref) < 0.08
    for a, b in zip(grads, ref_grads):
        assert rel_err(a, b) < 0.1


def _losses(fp8: bool, steps: int = 20) -> list[float]:
    torch.manual_seed(0)
    model = CausalLM(get_preset("debug", fp8=fp8))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(1)
    data = torch.randint(0, 256, (64,), generator=g).repeat(8)
    out = []
    for step in range(steps):
        x = torch.stack([data[i:i + 48] for i in range(step % 8, step % 8 + 4)])
        loss = model(x, labels=x, return_logits=False).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        out.append(loss.item())
    return out


def test_debug_student_trains_in_fp8_like_in_high_precision():
    hp, f8 = _losses(False), _losses(True)
    assert f8[-1] < f8[0] - 1.0  # it learns
    worst = max(abs(a - b) / b for a, b in zip(f8, hp))
    assert worst < 0.05, f"FP8 loss curve deviates {worst:.1%} from the fp32 one"


def test_fp8_model_trains_under_bf16_autocast():
    """model.fp8 with train.dtype = "bfloat16": the FP8 experts' weight quantisation runs outside autocast."""
    torch.manual_seed(0)
    model = CausalLM(get_preset("debug", fp8=True))
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(ids, labels=ids, return_logits=False).loss
    loss.backward()
    assert loss.isfinite() and all(p.grad is not None and p.grad.isfinite().all()
                                   for p in model.parameters() if p.requires_grad and p.grad is not None)
    assert model.layers[1].ffn.w_gate_up.grad.abs().sum() > 0
