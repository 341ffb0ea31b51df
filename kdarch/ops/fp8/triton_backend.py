"""The "triton" backend of the FP8 ops: the launchers of kdarch.kernels.fp8 as torch custom ops.

Why custom ops: torch.compile must trace FP8 layers through this backend without looking inside the
Triton launchers, so each op is one `torch.library.custom_op` (namespace "kdarch") with a fake that gives
output shapes and dtypes without running anything. Autograd is not registered here: the FP8 linear's
backward is itself made of these ops (kdarch.ops.fp8.linear), so the compiled backward holds them too.

The kernels module is imported on first use (kdarch imports where triton is not installed). Availability:
`fp8_triton_available()`, i.e. `kdarch.kernels.triton_usable((8, 9))`: its interpreter on, or a GPU with
fp8 tensor cores (sm89+: Ada, Hopper, ...).

Legend: R, C rows / cols of a quantised matrix; M, N, K a GEMM's out-rows, out-cols, reduction;
E experts; *_q e4m3fn data, *_s fp32 scales.
"""

from __future__ import annotations

import torch

from kdarch.kernels import triton_usable
from kdarch.kernels.fp8_ref import BLOCK, cdiv
from kdarch.ops.backend import register

Tensor = torch.Tensor
FP8 = torch.float8_e4m3fn


def _kernels():
    from kdarch.kernels import fp8 as k  # lazy: triton is a Linux-only dependency
    return k


def fp8_triton_available() -> bool:
    """Triton usable here for FP8: its interpreter on, or a GPU with fp8 tensor cores (sm89+)."""
    return triton_usable(min_capability=(8, 9))


@torch.library.custom_op("kdarch::fp8_quantize", mutates_args=())
def quantize_op(x: Tensor, group_rows: int, amax_floor: float, pow2_scale: bool) -> tuple[Tensor, Tensor]:
    """x [(E,) R, C] -> (q e4m3fn, same shape; s fp32 [(E,) ceil(R/G), ceil(C/128)])."""
    return _kernels().quantize(x, group_rows, amax_floor, pow2_scale)


@quantize_op.register_fake
def _(x, group_rows, amax_floor, pow2_scale):
    *lead, R, C = x.shape
    return x.new_empty(x.shape, dtype=FP8), x.new_empty((*lead, cdiv(R, group_rows), cdiv(C, BLOCK)),
                                                        dtype=torch.float32)


@torch.library.custom_op("kdarch::fp8_dequantize", mutates_args=())
def dequantize_op(q: Tensor, s: Tensor, group_rows: int, out_dtype: torch.dtype) -> Tensor:
    """q [R, C] * its tile scales, in out_dtype."""
    return _kernels().dequantize(q, s, group_rows, out_dtype)


@dequantize_op.register_fake
def _(q, s, group_rows, out_dtype):
    return q.new_empty(q.shape, dtype=out_dtype)


@torch.library.custom_op("kdarch::fp8_gemm", mutates_args=())
def gemm_op(a_q: Tensor, a_s: Tensor, b_q: Tensor, b_s: Tensor, b_group: int, out_dtype: torch.dtype) -> Tensor:
    """C [M, N] = A [M, K] · B [N, K]ᵀ, block-scaled (B's scales per 128×128 block or per row)."""
    return _kernels().fp8_gemm(a_q, a_s, b_q, b_s, b_group, out_dtype)


@gemm_op.register_fake
def _(a_q, a_s, b_q, b_s, b_group, out_dtype):
    return a_q.new_empty((a_q.shape[0], b_q.shape[0]), dtype=out_dtype)


@torch.library.custom_op("kdarch::fp8_grouped_gemm", mutates_args=())
def grouped_gemm_op(a_q: Tensor, a_s: Tensor, b_q: Tensor, b_s: Tensor, offs: Tensor,
                    out_dtype: torch.dtype) -> Tensor:
    """C[seg_e] = A[seg_e] · B[e]ᵀ for contiguous expert segments offs[e]:offs[e+1]."""
    return _kernels().fp8_grouped_gemm(a_q, a_s, b_q, b_s, offs, out_dtype)


@grouped_gemm_op.register_fake
def _(a_q, a_s, b_q, b_s, offs, out_dtype):
    return a_q.new_empty((a_q.shape[0], b_q.shape[1]), dtype=out_dtype)


@torch.library.custom_op("kdarch::fp8_kgrouped_gemm", mutates_args=())
def kgrouped_gemm_op(a_q: Tensor, a_s: Tensor, b_q: Tensor, b_s: Tensor, offs: Tensor,
                     out_dtype: torch.dtype) -> Tensor:
    """C[e] [N, K] = A[:, seg_e] · B[:, seg_e]ᵀ (K-grouped: the weight gradient of a grouped linear)."""
    return _kernels().fp8_kgrouped_gemm(a_q, a_s, b_q, b_s, offs, out_dtype)


@kgrouped_gemm_op.register_fake
def _(a_q, a_s, b_q, b_s, offs, out_dtype):
    return a_q.new_empty((offs.shape[0] - 1, a_q.shape[0], b_q.shape[0]), dtype=out_dtype)


register("fp8_quantize", "triton", quantize_op, available=fp8_triton_available)
register("fp8_dequantize", "triton", dequantize_op, available=fp8_triton_available)
register("fp8_gemm", "triton", gemm_op, available=fp8_triton_available)
register("fp8_grouped_gemm", "triton", grouped_gemm_op, available=fp8_triton_available)
register("fp8_kgrouped_gemm", "triton", kgrouped_gemm_op, available=fp8_triton_available)
