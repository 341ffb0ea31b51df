"""The "cpp" backend of the FP8 ops: quantisation and dequantisation compiled (csrc/fp8_ops.cpp), the GEMMs on
top of them.

Why the GEMMs are not compiled: on the CPU the block-scaled GEMM is dequantise-then-matmul (as in the torch
backend: torch._scaled_mm takes no 1×128 / 128×128 scales there), and the matmul is MKL's; what the torch
backend spends beyond it is the dequantisation, which the compiled op does in one pass. So each GEMM here is
the torch backend's recipe with the compiled dequantiser, and its result is the same to the bit (both
dequantisers are exact: q * scale in fp32).

Legend: M tokens (rows), K in-features, N out-features, E experts; *_q e4m3fn data, *_s fp32 scales,
offs_E1 segment offsets [E+1].
"""

from __future__ import annotations

import torch

from kdarch.kernels.fp8_ref import BLOCK
from kdarch.ops.backend import register
from kdarch.ops.cpp import ops as C
from kdarch.ops.cpp.build import check_device, cpp_available


def quantize_cpp(x, group_rows: int, amax_floor: float, pow2_scale: bool):
    """x [(E,) R, C] -> (q e4m3fn, same shape; s fp32 [(E,) ceil(R/G), ceil(C/128)])."""
    check_device("fp8_quantize", x)
    return C.quantize(x, group_rows, amax_floor, pow2_scale)


def dequantize_cpp(q_RC, s, group_rows: int, out_dtype: torch.dtype = torch.float32):
    check_device("fp8_dequantize", q_RC)
    return C.dequantize(q_RC, s, group_rows, out_dtype)


def gemm_cpp(a_q_MK, a_s, b_q_NK, b_s, b_group: int, out_dtype: torch.dtype):
    """C [M, N] = dequant(A) · dequant(B)ᵀ in fp32."""
    return (dequantize_cpp(a_q_MK, a_s, 1) @ dequantize_cpp(b_q_NK, b_s, b_group).T).to(out_dtype)


def _segments(offs_E1):
    o = offs_E1.tolist()  # host values, as in the torch backend (the CPU path)
    return list(zip(o[:-1], o[1:]))


def grouped_gemm_cpp(a_q_MK, a_s, b_q_ENK, b_s_E, offs_E1, out_dtype: torch.dtype):
    """C[seg_e] = dequant(A[seg_e]) · dequant(B[e])ᵀ for contiguous expert segments (empty ones included)."""
    a_MK = dequantize_cpp(a_q_MK, a_s, 1)
    out_MN = a_MK.new_zeros(a_MK.shape[0], b_q_ENK.shape[1])
    for e, (lo, hi) in enumerate(_segments(offs_E1)):
        if hi > lo:
            out_MN[lo:hi] = a_MK[lo:hi] @ dequantize_cpp(b_q_ENK[e], b_s_E[e], BLOCK).T
    return out_MN.to(out_dtype)


def kgrouped_gemm_cpp(a_q_NM, a_s, b_q_KM, b_s, offs_E1, out_dtype: torch.dtype):
    """C[e] [N, K] = dequant(A)[:, seg_e] · dequant(B)[:, seg_e]ᵀ (the weight gradient of a grouped linear)."""
    a_NM, b_KM = dequantize_cpp(a_q_NM, a_s, 1), dequantize_cpp(b_q_KM, b_s, 1)
    return torch.stack([a_NM[:, lo:hi] @ b_KM[:, lo:hi].T for lo, hi in _segments(offs_E1)]).to(out_dtype)


register("fp8_quantize", "cpp", quantize_cpp, available=cpp_available)
register("fp8_dequantize", "cpp", dequantize_cpp, available=cpp_available)
register("fp8_gemm", "cpp", gemm_cpp, available=cpp_available)
register("fp8_grouped_gemm", "cpp", grouped_gemm_cpp, available=cpp_available)
register("fp8_kgrouped_gemm", "cpp", kgrouped_gemm_cpp, available=cpp_available)
