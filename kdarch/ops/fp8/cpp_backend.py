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

import functools

import torch

from kdarch.ops.backend import register
from kdarch.ops.cpp import ops as C
from kdarch.ops.cpp.build import check_device, cpp_available
from kdarch.ops.fp8.torch_backend import gemm_torch, grouped_gemm_torch, kgrouped_gemm_torch


def quantize_cpp(x, group_rows: int, amax_floor: float, pow2_scale: bool):
    """x [(E,) R, C] -> (q e4m3fn, same shape; s fp32 [(E,) ceil(R/G), ceil(C/128)])."""
    check_device("fp8_quantize", x)
    return C.quantize(x, group_rows, amax_floor, pow2_scale)


def dequantize_cpp(q_RC, s, group_rows: int, out_dtype: torch.dtype = torch.float32):
    check_device("fp8_dequantize", q_RC)
    return C.dequantize(q_RC, s, group_rows, out_dtype)


# The torch backend's GEMM recipes with the compiled dequantiser (see the module docstring).
gemm_cpp = functools.partial(gemm_torch, dequantize=dequantize_cpp)
grouped_gemm_cpp = functools.partial(grouped_gemm_torch, dequantize=dequantize_cpp)
kgrouped_gemm_cpp = functools.partial(kgrouped_gemm_torch, dequantize=dequantize_cpp)


register("fp8_quantize", "cpp", quantize_cpp, available=cpp_available)
register("fp8_dequantize", "cpp", dequantize_cpp, available=cpp_available)
register("fp8_gemm", "cpp", gemm_cpp, available=cpp_available)
register("fp8_grouped_gemm", "cpp", grouped_gemm_cpp, available=cpp_available)
register("fp8_kgrouped_gemm", "cpp", kgrouped_gemm_cpp, available=cpp_available)
