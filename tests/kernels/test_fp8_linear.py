"""Fp8Linear / fp8_linear / fp8_grouped_linear: the DeepSeek-V3 FP8 training recipe, forward and backward.

Two kinds of checks: (1) the recipe is exactly the documented composition of quantise + block-scaled
GEMM (activations 1×128, weights 128×128, dY 1×128 along N for dX, dY and X 1×128 along tokens for
dW), to fp32-accumulation error; (2) the end-to-end error against fp32 is bounded (≈3.7% relative
Frobenius per FP8 GEMM for random normal data) and a small regression trains like fp32.
"""
import pytest
import torch
import torch.nn as nn

from kdarch.kernels import fp8_ref as ref
from kdarch.kernels.fp8_ref import GRAD_AMAX_FLOOR, rel_err
from kdarch.ops.fp8 import Fp8Linear, fp8_grouped_linear, fp8_linear

DEV = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ["torch", "triton"]
FP8_REL_ERR = 0.06  # bound for one FP8 GEMM (or its gradient) vs fp32 on random normal data


def _fwd_bwd(fn, x, w, *extra, dy):
    x, w = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    y = fn(x, w, *extra)
    y.backward(dy)
    return y.detach(), x.grad, w.grad


def _close_to_accum(got, want_fp64, K):
    tol = (K + 8) * 2.0 ** -24 * want_fp64.abs().max() + 1e-30
    assert (got.double() - want_fp64).abs().max() <= tol * 4


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp8_linear_is_the_documented_recipe(backend):
    torch.manual_seed(0)
    M, K, N = 70, 200, 136
    x, w, dy = torch.randn(M, K, device=DEV), torch.randn(N, K, device=DEV), torch.randn(M, N, device=DEV)
    y, dx, dw = _fwd_bwd(lambda a, b: fp8_linear(a, b, backend=backend), x, w, dy=dy)
    xq, wq = ref.quantize_act_ref(x.cpu()), ref.quantize_weight_ref(w.cpu())
    gq = ref.quantize_act_ref(dy.cpu(), GRAD_AMAX_FLOOR)
    gtq, xtq = ref.quantize_act_ref(dy.cpu().t(), GRAD_AMAX_FLOOR), ref.quantize_act_ref(x.cpu().t())
    _close_to_accum(y.cpu(), ref.fp8_gemm_ref(*xq, *wq, torch.float64), K)
    _close_to_accum(dx.cpu(), ref.fp8_gemm_ref(*gq, wq[0].t(), wq[1].t(), torch.float64), N)
    _close_to_accum(dw.cpu(), ref.fp8_gemm_ref(*gtq, *xtq, torch.float64), M)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_linear_error_vs_fp32_forward_and_backward(dtype):
    torch.manual_seed(1)
    x, w, dy = torch.randn(256, 384, device=DEV), torch.randn(512, 384, device=DEV) * 0.05, torch.randn(256, 512,
                                                                                                       device=DEV)
    y, dx, dw = _fwd_bwd(lambda a, b: fp8_linear(a, b), x.to(dtype), w.to(dtype), dy=dy.to(dtype))
    assert y.dtype == dx.dtype == dw.dtype == dtype  # activations' and master weight's dtypes
    y32, dx32, dw32 = _fwd_bwd(lambda a, b: a @ b.T, x, w, dy=dy)
    errs = [rel_err(a.float(), b) for a, b in ((y, y32), (dx, dx32), (dw, dw32))]
    print(f"fp8_linear vs fp32 ({dtype}): y {errs[0]:.4f}  dX {errs[1]:.4f}  dW {errs[2]:.4f}")
    assert all(0.01 < e < FP8_REL_ERR for e in errs)


def test_fp8_linear_module_is_a_drop_in_for_nn_linear():
    lin = nn.Linear(200, 96, bias=False)
    f = Fp8Linear(200, 96, bias=False)
    assert isinstance(f, nn.Linear)
    assert {k: v.shape for k, v in f.state_dict().items()} == {k: v.shape for k, v in lin.state_dict().items()}
    f.load_state_dict(lin.state_dict())
    g = Fp8Linear.from_linear(lin)
    assert g.weight is lin.weight and g.bias is None and "fp8" in repr(g)
    x = torch.randn(2, 5, 200)
    torch.testing.assert_close(f(x), g(x), rtol=0, atol=0)
    assert f(x).shape == (2, 5, 96) and rel_err(f(x), lin(x)) < FP8_REL_ERR
    fb = Fp8Linear(200, 96)  # with bias, as nn.Linear's default
    x.requires_grad_()
    fb(x).sum().backward()
    assert fb.bias.grad is not None and torch.equal(fb.bias.grad, torch.full((96,), 10.0))
    with torch.no_grad():  # inference path: same numbers, no backward operands
        torch.testing.assert_close(f(x), g(x.detach()))


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp8_grouped_linear_forward_backward(backend):
    torch.manual_seed(2)
    counts, K, N = [0, 1, 130, 5, 0, 64, 33], 200, 96
    offs = torch.tensor([0] + counts, device=DEV).cumsum(0)
    M = int(offs[-1])
    x, w, dy = torch.randn(M, K, device=DEV), torch.randn(7, N, K, device=DEV), torch.randn(M, N, device=DEV)
    y, dx, dw = _fwd_bwd(lambda a, b: fp8_grouped_linear(a, b, offs, backend=backend), x, w, dy=dy)

    def grouped32(a, b):
        o = offs.tolist()
        return torch.cat([a[o[e]:o[e + 1]] @ b[e].T for e in range(7)])

    y32, dx32, dw32 = _fwd_bwd(grouped32, x, w, dy=dy)
    errs = [rel_err(a, b) for a, b in ((y, y32), (dx, dx32), (dw, dw32))]
    print(f"fp8_grouped_linear vs fp32 ({backend}): y {errs[0]:.4f}  dX {errs[1]:.4f}  dW {errs[2]:.4f}")
    assert all(e < FP8_REL_ERR for e in errs)
    assert not dw[0].any() and not dw[4].any()
    gtq, xtq = ref.quantize_act_ref(dy.cpu().t(), GRAD_AMAX_FLOOR), ref.quantize_act_ref(x.cpu().t())
    _close_to_accum(dw.cpu(), ref.fp8_kgrouped_gemm_ref(*gtq, *xtq, offs.cpu(), torch.float64), M)


def test_fp8_linear_compiles_fullgraph_forward_and_backward():
    """custom ops + fakes + autograd.Function: torch.compile traces the Triton path in one graph, same numbers."""
    torch.manual_seed(4)
    x, w = torch.randn(64, 256, device=DEV), torch.randn(128, 256, device=DEV)
    fn = lambda a, b: fp8_linear(a, b, backend="triton")  # noqa: E731
    dy = torch.randn(64, 128, device=DEV)
    got = _fwd_bwd(torch.compile(fn, backend="aot_eager", fullgraph=True), x, w, dy=dy)
    for g, want in zip(got, _fwd_bwd(fn, x, w, dy=dy)):
        torch.testing.assert_close(g, want, rtol=0, atol=0)


def _train(fp8: bool, steps: int = 30):
    torch.manual_seed(0)
    X = torch.randn(512, 128)
    Y = torch.tanh(X @ (torch.randn(128, 64) / 128 ** 0.5)) + 0.1 * X[:, :64] ** 2
    torch.manual_seed(1)
    L = Fp8Linear if fp8 else nn.Linear
    net = nn.Sequential(L(128, 256, bias=False), nn.GELU(), L(256, 64, bias=False))
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    losses = []
    for i in range(steps):
        rows = slice(i * 128 % 512, i * 128 % 512 + 128)
        loss = (net(X[rows]) - Y[rows]).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return torch.tensor(losses)


def test_tiny_mlp_trains_like_fp32():
    l32, l8 = _train(False), _train(True)
    assert l32[-1] < l32[0] / 5  # the run actually learns
    dev = ((l8 - l32).abs() / l32).max().item()
    print(f"FP8 vs fp32 loss curve: max relative deviation {dev:.4f} over {len(l32)} steps")
    assert dev < 0.05


def test_fp8_linear_under_autocast_takes_the_autocast_dtype():
    """Inside bf16 autocast the FP8 recipe still sets every precision; X and Y take bf16, as a matmul's would."""
    torch.manual_seed(5)
    x, w = torch.randn(64, 256, device=DEV, requires_grad=True), torch.randn(128, 256, device=DEV)
    with torch.autocast(torch.device(DEV).type, dtype=torch.bfloat16):
        y = fp8_linear(x, w)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, fp8_linear(x.detach().bfloat16(), w), rtol=0, atol=0)
    y.float().sum().backward()
    assert x.grad is not None and x.grad.dtype == torch.float32
