"""Small shared helpers for testing the MoE expert kernels against kdarch.kernels.moe_ref.

Every moe_ffn backend is checked on the same awkward cases with the same inputs and the same
error measure, so the cases live here once rather than in each test file.

Legend: T tokens, K top-k, E experts, H hidden, I expert intermediate.
"""
from __future__ import annotations

import torch

# (name, T, H, I, E, K, routing): "random" = K distinct experts per token,
# "skip0" = expert 0 never chosen, "one" = every token to expert E-1.
MOE_CASES = [
    ("1tok", 1, 32, 16, 4, 2, "random"),
    ("7tok", 7, 32, 16, 4, 2, "random"),
    ("odd_h97_7exp", 7, 97, 24, 7, 3, "random"),
    ("top1", 9, 32, 16, 7, 1, "random"),
    ("topk_eq_E", 5, 32, 16, 4, 4, "random"),
    ("empty_expert", 8, 32, 16, 6, 2, "skip0"),
    ("all_to_one", 7, 32, 16, 5, 1, "one"),
]
MOE_CASE_IDS = [c[0] for c in MOE_CASES]
MOE_GRAD_NAMES = ["out", "d_x", "d_topk_weights", "d_w_gate_up", "d_w_down"]


def make_ids(T: int, E: int, K: int, routing: str, gen: torch.Generator) -> torch.Tensor:
    if routing == "one":
        return torch.full((T, K), E - 1, dtype=torch.int64)
    lo = 1 if routing == "skip0" else 0
    return torch.stack([lo + torch.randperm(E - lo, generator=gen)[:K] for _ in range(T)])


def make_inputs(T, H, I, E, K, routing, dtype=torch.float32, seed=0):
    """(x [T, H], topk_ids [T, K], topk_weights [T, K], w_gate_up [E, 2I, H], w_down [E, H, I])."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=gen)
    ids = make_ids(T, E, K, routing, gen)
    w = torch.rand(T, K, generator=gen)
    wgu = torch.randn(E, 2 * I, H, generator=gen) / H**0.5
    wd = torch.randn(E, H, I, generator=gen) / I**0.5
    return x.to(dtype), ids, w, wgu.to(dtype), wd.to(dtype)


def fwd_bwd(fn, x, ids, w, wgu, wd, grad_seed=1):
    """Output and grads of (x, topk_weights, w_gate_up, w_down), all as fp32."""
    leaves = [t.detach().clone().requires_grad_() for t in (x, w, wgu, wd)]
    out = fn(leaves[0], ids, leaves[1], leaves[2], leaves[3])
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed)).to(out.device, out.dtype)
    return [t.float() for t in (out, *torch.autograd.grad(out, leaves, g))]


def max_rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    """max |a - ref| / max |ref|."""
    return ((a - ref).abs().max() / ref.abs().max().clamp_min(1e-12)).item()


def moe_ffn_lowp(x, ids, w, wgu, wd):
    """The same math run by PyTorch in x.dtype, expert by expert: the error bar for fp16 / bf16."""
    I, out = wd.shape[-1], torch.zeros_like(x)
    for e in range(wgu.shape[0]):
        t, k = (ids == e).nonzero(as_tuple=True)
        h = x[t] @ wgu[e].T
        y = (torch.nn.functional.silu(h[:, :I]) * h[:, I:]) @ wd[e].T
        out = out.index_add(0, t, y * w[t, k, None].to(x.dtype))
    return out
