"""RMSNorm's hand-written backward against autograd on the plain formula in float64, and what it keeps.

Legend: B batch, T tokens, D width.
"""
import pytest
import torch

from kdarch.model.layers import RMSNorm


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
        err = ((got.double() - ref).abs().max() / ref.abs().max()).item()
        assert err < tol


def test_rmsnorm_keeps_only_its_input_and_the_inverse_rms():
    norm = RMSNorm(64)
    x = torch.randn(4, 8, 64, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        norm(x)
    shapes = sorted(tuple(t.shape) for t in saved if t is not norm.weight)
    assert shapes == [(4, 8, 1), (4, 8, 64)]  # x and rstd; no normalised copy of x
