"""The compiled SwiGLU between the expert GEMMs against autograd on the plain formula in float64.

y = w * silu(gate) * up per row; its backward gives d h = [d gate | d up], d w (a row sum) and y again. The
kernel computes in fp32 with an exp polynomial of its own, so it must match the float64 reference to fp32
rounding over the whole range exp sees (large |gate| included), for widths that are and are not a multiple of
its 16 partial sums, in fp32 and bf16, with the same bits for 1 and 2 threads.

Legend: M rows, I expert width.
"""
import pytest
import torch
import torch.nn.functional as F

from kdarch.kernels.testing import max_rel_err
from kdarch.ops.cpp import ops as C
from kdarch.ops.moe.torch_backend import swiglu_weighted, swiglu_weighted_bwd


def reference(h_M2I, w_M1, grad_y_MI):
    """(y, d h, d w) in float64 by autograd on w * silu(gate) * up."""
    h = h_M2I.double().requires_grad_()
    w = w_M1.double().requires_grad_()
    gate, up = h.chunk(2, dim=-1)
    y = w * F.silu(gate) * up
    y.backward(grad_y_MI.double())
    return y.detach(), h.grad, w.grad.reshape(-1)


def inputs(M, I, dtype, scale=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(M, 2 * I, generator=g) * scale).to(dtype)
    return h, torch.rand(M, 1, generator=g), torch.randn(M, I, generator=g)


@pytest.mark.parametrize("M, I", [(1, 1), (7, 16), (33, 37), (256, 256)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_matches_float64_autograd(lib, M, I, dtype):
    h, w, gy = inputs(M, I, dtype)
    y_ref, gh_ref, gw_ref = reference(h, w, gy)
    tol = 1e-6 if dtype == torch.float32 else 1e-2  # bf16 outputs: one rounding of the result
    y = C.swiglu_forward(h, w)
    gh, gw, y_again = C.swiglu_backward(gy, h, w)
    assert y.dtype == gh.dtype == y_again.dtype == dtype and gw.dtype == torch.float32
    assert y.shape == (M, I) and gh.shape == (M, 2 * I) and gw.shape == (M,)
    assert max_rel_err(y.double(), y_ref) < tol and max_rel_err(y_again.double(), y_ref) < tol
    assert max_rel_err(gh.double(), gh_ref) < tol and max_rel_err(gw.double(), gw_ref) < 1e-6
    torch.testing.assert_close(y_again, y, rtol=0, atol=0)


def test_swiglu_exp_over_its_whole_range(lib):
    """Gates from -100 to 100: exp(-gate) overflows and underflows there; silu must stay finite and exact."""
    gate = torch.linspace(-100, 100, 4001)[:, None]
    h = torch.cat((gate, torch.ones_like(gate)), dim=1)
    w, gy = torch.ones(gate.shape[0], 1), torch.ones(gate.shape[0], 1)
    y_ref, gh_ref, _ = reference(h, w, gy)
    y = C.swiglu_forward(h, w)
    gh, _, _ = C.swiglu_backward(gy, h, w)
    assert torch.isfinite(y).all() and torch.isfinite(gh).all()
    assert (y.double() - y_ref).abs().max() < 4e-6 and (gh.double() - gh_ref).abs().max() < 4e-6  # torch's: 1.2e-6


def test_swiglu_agrees_with_the_torch_pair_and_threads(lib, threads):
    h, w, gy = inputs(300, 96, torch.float32, seed=3)
    assert max_rel_err(C.swiglu_forward(h, w).double(), swiglu_weighted(h, w).double()) < 1e-6
    for a, b in zip(C.swiglu_backward(gy, h, w), swiglu_weighted_bwd(gy, h, w)):
        assert max_rel_err(a.double(), b.double()) < 1e-6
    one = threads(1, C.swiglu_backward, gy, h, w)
    two = threads(2, C.swiglu_backward, gy, h, w)
    assert all(torch.equal(a, b) for a, b in zip(one, two))


def test_swiglu_ops_refuse_bad_inputs(lib):
    h, w, gy = inputs(4, 8, torch.float32)
    with pytest.raises(RuntimeError, match=r"swiglu_forward: h: expected a float tensor \[M, 2I\]"):
        C.swiglu_forward(h[:, :15], w)
    with pytest.raises(RuntimeError, match=r"swiglu_forward: w: expected a float32 tensor of M=4"):
        C.swiglu_forward(h, w[:3])
    with pytest.raises(RuntimeError, match=r"swiglu_backward: grad_y: expected a float32 CPU tensor \[M=4, I=8\]"):
        C.swiglu_backward(gy[:, :7], h, w)


def test_swiglu_ops_pass_opcheck(lib):
    h, w, gy = inputs(5, 24, torch.float32)
    checks = ("test_schema", "test_faketensor")
    torch.library.opcheck(lib.swiglu_forward, (h, w.reshape(-1)), test_utils=checks)
    torch.library.opcheck(lib.swiglu_backward, (gy, h, w.reshape(-1)), test_utils=checks)
