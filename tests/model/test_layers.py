"""RMSNorm's and the SwiGLU MLP's hand-written backwards against autograd on the plain formulas in float64, and
what they keep.

Legend: B batch, T tokens, D width, I MLP width.
"""
import pytest
import torch

from kdarch.kernels.testing import max_rel_err
from kdarch.model.layers import MLP, RMSNorm, _SwiGLU


def reference(x_BTD, weight_D, eps):
    """(y, d x, d w) of x / sqrt(mean(x^2) + eps) * w by float64 autograd, for the incoming gradient ones * 0.5 + x."""
    x = x_BTD.double().requires_grad_()
    w = weight_D.double().requires_grad_()
    y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w
    y.backward(0.5 + x_BTD.double().detach())
    return y.detach(), x.grad, w.grad


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("D", [3, 7, 512])
def test_rmsnorm_matches_float64_autograd(dtype, tol, D):
    g = torch.Generator().manual_seed(D)
    norm = RMSNorm(D, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(D, generator=g))
    x = (torch.randn(3, 5, D, generator=g) * 4).to(dtype).requires_grad_()
    y = norm(x)
    y.backward((0.5 + x.detach().double()).to(y.dtype))
    y_ref, gx_ref, gw_ref = reference(x.detach(), norm.weight.detach(), 1e-6)
    assert y.dtype == torch.promote_types(dtype, torch.float32) and x.grad.dtype == dtype
    for got, ref in ((y, y_ref), (x.grad, gx_ref), (norm.weight.grad, gw_ref)):
        assert max_rel_err(got.double(), ref) < tol


def test_rmsnorm_keeps_only_its_input_and_the_inverse_rms():
    norm = RMSNorm(64)
    x = torch.randn(4, 8, 64, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        norm(x)
    shapes = sorted(tuple(t.shape) for t in saved if t is not norm.weight)
    assert shapes == [(4, 8, 1), (4, 8, 64)]  # x and rstd; no normalised copy of x


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-6), (torch.bfloat16, 3e-2)])
def test_swiglu_matches_float64_autograd(dtype, tol):
    g = torch.Generator().manual_seed(0)
    gate_up = (torch.randn(4, 6, 2 * 40, generator=g) * 4).to(dtype).requires_grad_()
    grad = torch.randn(4, 6, 40, generator=g)
    h = _SwiGLU.apply(gate_up)
    h.backward(grad.to(dtype))
    ref_in = gate_up.detach().double().requires_grad_()
    gate, up = ref_in.chunk(2, dim=-1)
    ref = torch.nn.functional.silu(gate) * up
    ref.backward(grad.to(dtype).double())
    for got, want in ((h, ref), (gate_up.grad, ref_in.grad)):
        assert got.dtype == dtype
        assert max_rel_err(got.double(), want) < tol


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_gradients_are_autograds_bit_for_bit(dtype):
    gate_up = torch.randn(7, 2 * 33).to(dtype).requires_grad_()
    grad = torch.randn(7, 33).to(dtype)
    (got,) = torch.autograd.grad(_SwiGLU.apply(gate_up), gate_up, grad)
    gate, up = gate_up.chunk(2, dim=-1)
    (want,) = torch.autograd.grad(torch.nn.functional.silu(gate) * up, gate_up, grad)
    assert torch.equal(got, want)


def test_mlp_keeps_its_input_the_projection_and_the_product():
    mlp = MLP(16, 24)
    x = torch.randn(3, 5, 16, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        mlp(x)
    params = {p.data_ptr() for p in mlp.parameters()}
    sizes = sorted(t.numel() for t in saved if t.data_ptr() not in params)
    assert sizes == [15 * 16, 15 * 24, 15 * 48]  # x, silu(gate) * up, gate | up; no silu(gate)
