"""The "triton" backends of `moe_ffn` and `moe_ffn_fp8`: kdarch.kernels.moe_dispatch as torch custom ops.

Why custom ops: torch.compile must trace the model through this backend without looking inside the
Triton launchers, so routing metadata, forward and backward are each one `torch.library.custom_op`
(namespace "kdarch") with a fake implementation that gives output shapes without running anything;
the forward op's autograd (register_autograd) calls the backward op, so the compiled backward graph
holds an opaque op too. The dataflow mirrors the torch backend's `grouped_ffn_fwd` / `grouped_ffn_bwd`:
routing weight folded into the down projection's input, only the [M, 2I] gate/up pre-activations kept for
backward.

`moe_ffn_fp8` on Triton is the torch backend's FP8 composition with the routing custom op below and the
"triton" FP8 ops of kdarch.ops.fp8; it is available where FP8 Triton is (sm89+ GPUs, or the interpreter).

The kernels module is imported on first use: TRITON_INTERPRET is read when kernels are defined, and
kdarch must import on machines without triton. Availability: `kdarch.kernels.triton_usable()` (triton
importable and either CUDA or its interpreter on; CPU tensors run under the interpreter for correctness
and are never auto-picked).

Legend: T tokens, K slots per token (top-k), E experts, H hidden, I expert intermediate, M = T*K rows.
"""

from __future__ import annotations

import functools

import torch

from kdarch.checks import fail
from kdarch.kernels import triton_interpreting, triton_usable
from kdarch.ops.backend import register
from kdarch.ops.fp8.triton_backend import fp8_triton_available
from kdarch.ops.moe.torch_backend import moe_ffn_fp8_composed

Tensor = torch.Tensor


@functools.cache
def _kernels():
    from kdarch.kernels import moe_dispatch
    return moe_dispatch


def triton_available() -> bool:
    """triton importable, and a GPU to run on or the interpreter switched on (TRITON_INTERPRET=1)."""
    return triton_usable()


# ------------------------------------------------------------------------------------- custom ops
@torch.library.custom_op("kdarch::moe_routing", mutates_args=())
def moe_routing(topk_ids: Tensor, n_experts: int, pad_to: int = 1) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(counts [E], offsets [E+1], sorted_idx [M or padded], inv_idx [M]), int64; see moe_dispatch.routing_metadata."""
    return _kernels().routing_metadata(topk_ids, n_experts, pad_to)


@moe_routing.register_fake
def _(topk_ids, n_experts, pad_to=1):
    M, i64 = topk_ids.numel(), dict(dtype=torch.int64, device=topk_ids.device)
    return (torch.empty(n_experts, **i64), torch.empty(n_experts + 1, **i64),
            torch.empty(_kernels().padded_rows(M, n_experts, pad_to), **i64), torch.empty(M, **i64))


@torch.library.custom_op("kdarch::moe_ffn_fwd", mutates_args=())
def moe_ffn_fwd(x: Tensor, topk_weights: Tensor, w_gate_up: Tensor, w_down: Tensor, offsets: Tensor,
                sorted_idx: Tensor, inv_idx: Tensor) -> tuple[Tensor, Tensor]:
    """(out [T, H], h [M, 2I] pre-activations saved for backward)."""
    return _kernels().moe_ffn_fwd(x, topk_weights, w_gate_up, w_down, offsets, sorted_idx, inv_idx)


@moe_ffn_fwd.register_fake
def _(x, topk_weights, w_gate_up, w_down, offsets, sorted_idx, inv_idx):
    return x.new_empty(x.shape), x.new_empty(inv_idx.shape[0], w_gate_up.shape[1])


@torch.library.custom_op("kdarch::moe_ffn_bwd", mutates_args=())
def moe_ffn_bwd(grad_out: Tensor, x: Tensor, topk_weights: Tensor, w_gate_up: Tensor, w_down: Tensor,
                offsets: Tensor, sorted_idx: Tensor, inv_idx: Tensor, h: Tensor
                ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(d x, d topk_weights, d w_gate_up, d w_down)."""
    return _kernels().moe_ffn_bwd(grad_out, x, topk_weights, w_gate_up, w_down, offsets, sorted_idx, inv_idx, h)


@moe_ffn_bwd.register_fake
def _(grad_out, x, topk_weights, w_gate_up, w_down, *_):
    return tuple(torch.empty(t.shape, dtype=t.dtype, device=x.device) for t in (x, topk_weights, w_gate_up, w_down))


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs, output[1])
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, grad_out, _grad_h):
    x, topk_weights, w_gate_up, w_down, offsets, sorted_idx, inv_idx, h = ctx.saved_tensors
    grads = moe_ffn_bwd(grad_out, x, topk_weights, w_gate_up, w_down, offsets, sorted_idx, inv_idx, h)
    return *grads, None, None, None


moe_ffn_fwd.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------- the backends
def _check_device(op: str, x_TH: Tensor) -> None:
    if x_TH.device.type == "cuda" or (x_TH.device.type == "cpu" and triton_interpreting()):
        return
    fail(f"{op}: x", "CUDA tensors for backend 'triton' (CPU tensors run only under the Triton interpreter: "
         "TRITON_INTERPRET=1, set before triton is imported; use backend='torch' on the CPU)", x_TH.device)


def moe_ffn_triton(x_TH, topk_ids_TK, topk_weights_TK, w_gate_up_E2IH, w_down_EHI):
    """moe_ffn on the Triton kernels (inputs already validated by kdarch.ops.moe.moe_ffn)."""
    _check_device("moe_ffn", x_TH)
    _, offsets_E1, sorted_idx_M, inv_idx_M = moe_routing(topk_ids_TK, w_gate_up_E2IH.shape[0])
    out_TH, _ = moe_ffn_fwd(x_TH, topk_weights_TK, w_gate_up_E2IH, w_down_EHI, offsets_E1, sorted_idx_M, inv_idx_M)
    return out_TH


def moe_ffn_fp8_triton(x_TH, topk_ids_TK, topk_weights_TK, w_gate_up_E2IH, w_down_EHI):
    """moe_ffn_fp8 with the routing kernels and the "triton" FP8 quantise / grouped GEMM ops."""
    _check_device("moe_ffn", x_TH)
    return moe_ffn_fp8_composed(x_TH, topk_ids_TK, topk_weights_TK, w_gate_up_E2IH, w_down_EHI,
                                routing=moe_routing, fp8_backend="triton")


register("moe_ffn", "triton", moe_ffn_triton, available=triton_available)
register("moe_ffn_fp8", "triton", moe_ffn_fp8_triton, available=fp8_triton_available)
