"""The "torch" backend of the FP8 ops: vectorised PyTorch, the CPU fast path and the fallback on any device.

Why not torch._scaled_mm: on the CPU it takes only per-tensor / per-row scales, not DeepSeek's 1×128 /
128×128 blocks. So quantisation is the reference quantiser (already vectorised: kdarch.kernels.fp8_ref)
and each GEMM dequantises its operands (broadcasting the scales over tile views where the shape allows)
and multiplies in fp32. The grouped GEMMs loop over expert segments on the host (`offs.tolist()`): a sync
that costs nothing on the CPU, which is what this backend is for.

Inputs are validated by the functional API (kdarch.ops.fp8); each function has the one signature its op
has in every backend.

Legend: R, C rows / cols of a quantised matrix; M tokens (rows), K in-features, N out-features,
E experts; *_q e4m3fn data, *_s fp32 scales, offs_E1 segment offsets [E+1].
"""

from __future__ import annotations

import torch

from kdarch.kernels import fp8_ref as ref
from kdarch.kernels.fp8_ref import BLOCK
from kdarch.ops.backend import register


def dequantize_torch(q_RC, s, group_rows: int, out_dtype: torch.dtype = torch.float32):
    """q * scale; broadcasts the scales over tile views where the shape allows, else uses the reference."""
    R, C = q_RC.shape
    if C % BLOCK or (group_rows > 1 and R % BLOCK):
        return ref.dequantize_ref(q_RC, s, group_rows).to(out_dtype)
    q = q_RC.float().reshape(R // group_rows, group_rows, C // BLOCK, BLOCK)
    return (q * s[:, None, :, None]).reshape(R, C).to(out_dtype)


def quantize_torch(x, group_rows: int, amax_floor: float, pow2_scale: bool):
    """x [(E,) R, C] -> (q e4m3fn, same shape; s fp32 [(E,) ceil(R/G), ceil(C/128)]); experts one by one."""
    if x.dim() == 3:
        qs = [ref.quantize_ref(x_e, group_rows, amax_floor, pow2_scale) for x_e in x]
        return torch.stack([q for q, _ in qs]), torch.stack([s for _, s in qs])
    return ref.quantize_ref(x, group_rows, amax_floor, pow2_scale)


def gemm_torch(a_q_MK, a_s, b_q_NK, b_s, b_group: int, out_dtype: torch.dtype, dequantize=dequantize_torch):
    """C [M, N] = dequant(A) · dequant(B)ᵀ in fp32 (`dequantize`: this backend's, or the cpp one)."""
    return (dequantize(a_q_MK, a_s, 1) @ dequantize(b_q_NK, b_s, b_group).T).to(out_dtype)


def _segments(offs_E1):
    o = offs_E1.tolist()  # host values: the torch path is the CPU path
    return list(zip(o[:-1], o[1:]))


def grouped_gemm_torch(a_q_MK, a_s, b_q_ENK, b_s_E, offs_E1, out_dtype: torch.dtype, dequantize=dequantize_torch):
    """C[seg_e] = dequant(A[seg_e]) · dequant(B[e])ᵀ for contiguous expert segments (empty ones included)."""
    a_MK = dequantize(a_q_MK, a_s, 1)
    out_MN = a_MK.new_zeros(a_MK.shape[0], b_q_ENK.shape[1])
    for e, (lo, hi) in enumerate(_segments(offs_E1)):
        if hi > lo:
            out_MN[lo:hi] = a_MK[lo:hi] @ dequantize(b_q_ENK[e], b_s_E[e], BLOCK).T
    return out_MN.to(out_dtype)


def kgrouped_gemm_torch(a_q_NM, a_s, b_q_KM, b_s, offs_E1, out_dtype: torch.dtype, dequantize=dequantize_torch):
    """C[e] [N, K] = dequant(A)[:, seg_e] · dequant(B)[:, seg_e]ᵀ (the weight gradient of a grouped linear)."""
    a_NM, b_KM = dequantize(a_q_NM, a_s, 1), dequantize(b_q_KM, b_s, 1)
    return torch.stack([a_NM[:, lo:hi] @ b_KM[:, lo:hi].T for lo, hi in _segments(offs_E1)]).to(out_dtype)


register("fp8_quantize", "torch", quantize_torch)
register("fp8_dequantize", "torch", dequantize_torch)
register("fp8_gemm", "torch", gemm_torch)
register("fp8_grouped_gemm", "torch", grouped_gemm_torch)
register("fp8_kgrouped_gemm", "torch", kgrouped_gemm_torch)
