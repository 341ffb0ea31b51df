"""kdarch.ops.fp8: FP8 (e4m3fn) block-scaled ops of the DeepSeek-V3 recipe, and the FP8 linears built on them.

Why a functional layer: callers quantise, dequantise and multiply without knowing which backend runs.
Semantics are defined once, in `kdarch.kernels.fp8_ref` (1×128 activation tiles, 128×128 weight blocks,
scale = max(amax, floor)/448, RNE, partial tiles for sizes that are not multiples of 128, inf/NaN poisons
its tile). Inputs are checked here, once, in kdarch.checks' style; the registry (kdarch.ops.backend) then
picks the implementation of each op ("fp8_quantize", "fp8_dequantize", "fp8_gemm", "fp8_grouped_gemm",
"fp8_kgrouped_gemm"): "torch" (torch_backend.py, vectorised PyTorch), "triton" (triton_backend.py,
custom ops over kdarch.kernels.fp8) or "cpp" (cpp_backend.py: compiled quantise / dequantise).
The training layers (`fp8_linear`, `fp8_grouped_linear`, `Fp8Linear`) live in linear.py and are re-exported
here.

Shape, dtype and device checks are always on; the one value check (grouped offsets in order, a host sync)
runs only where `kdarch.checks.value_checks_on` says so.

Legend: M tokens (rows), K in-features, N out-features, E experts; *_q e4m3fn data, *_s fp32 scales.
"""

from __future__ import annotations

import torch

from kdarch.checks import check, fail, tensor_arg
from kdarch.kernels.fp8_ref import AMAX_FLOOR, BLOCK, GRAD_AMAX_FLOOR, cdiv
from kdarch.ops.backend import resolve
from kdarch.ops.fp8 import cpp_backend as _cpp_backend  # noqa: F401  (registers the "cpp" backends)
from kdarch.ops.fp8 import torch_backend as _torch_backend  # noqa: F401  (registers the "torch" backends)
from kdarch.ops.fp8 import triton_backend as _triton_backend  # noqa: F401  (registers the "triton" backends)
from kdarch.ops.fp8.linear import OUT_DTYPES, Fp8Linear, float_arg, fp8_grouped_linear, fp8_linear, offsets_arg

FP8 = torch.float8_e4m3fn
__all__ = ["AMAX_FLOOR", "GRAD_AMAX_FLOOR", "Fp8Linear", "dequantize", "fp8_gemm", "fp8_grouped_gemm",
           "fp8_grouped_linear", "fp8_linear", "quantize_act", "quantize_weight"]


# ---- input checks ---------------------------------------------------------------------------------------------

def _quantised_arg(fn: str, q_name: str, q, s_name: str, s, blocks_ok: bool) -> int:
    """(q, s) of function `fn` is a quantised 2-D matrix and its scales; returns the scales' row group (1 or
    128). blocks_ok: 128×128 block scales are allowed besides 1×128 tile scales."""
    tensor_arg(f"{fn}: {q_name}", q, dim=2, dtypes=(FP8,), what="a 2-D float8_e4m3fn tensor")
    R, C = q.shape
    name = f"{fn}: {s_name}"
    tensor_arg(name, s, dtypes=(torch.float32,), shape=(None, cdiv(C, BLOCK)),
               what=f"a float32 tensor [rows, ceil({C}/128)={cdiv(C, BLOCK)}]")
    check(s.device == q.device, name, f"a tensor on {q_name}'s device ({q.device})", s.device)
    if s.shape[0] == R:
        return 1
    if blocks_ok and s.shape[0] == cdiv(R, BLOCK):
        return BLOCK
    fail(name, f"{R} rows (1×128 tiles of {q_name} [{R}, {C}])"
         + (f" or {cdiv(R, BLOCK)} rows (128×128 blocks)" if blocks_ok else ""), s)


def _out_dtype_arg(name: str, out_dtype) -> None:
    check(out_dtype in OUT_DTYPES, f"{name}: out_dtype", "torch.bfloat16 or torch.float32", out_dtype)


# ---- functional API -----------------------------------------------------------------------------------------

def quantize_act(x: torch.Tensor, *, amax_floor: float = AMAX_FLOOR, pow2_scale: bool = False,
                 backend: str | None = None):
    """x [..., K] -> (q e4m3fn [..., K], scales fp32 [..., ceil(K/128)]), one scale per row per 128 columns."""
    float_arg("quantize_act: x", x, tuple(range(1, 9)), "[..., K]")
    x2 = x.reshape(-1, x.shape[-1])
    q, s = resolve("fp8_quantize", backend, x.device)(x2, 1, float(amax_floor), bool(pow2_scale))
    return q.view(x.shape), s.view(*x.shape[:-1], s.shape[-1])


def quantize_weight(w: torch.Tensor, *, amax_floor: float = AMAX_FLOOR, pow2_scale: bool = False,
                    backend: str | None = None):
    """w [N, K] (or [E, N, K]) -> (q e4m3fn, same shape; scales fp32 [(E,) ceil(N/128), ceil(K/128)])."""
    float_arg("quantize_weight: w", w, (2, 3), "[N, K] or [E, N, K]")
    return resolve("fp8_quantize", backend, w.device)(w, BLOCK, float(amax_floor), bool(pow2_scale))


def dequantize(q: torch.Tensor, s: torch.Tensor, *, out_dtype: torch.dtype = torch.float32,
               backend: str | None = None) -> torch.Tensor:
    """q * scale for a 2-D (q, s) pair; the tile shape (1×128 or 128×128) is read from s's shape."""
    g = _quantised_arg("dequantize", "q", q, "s", s, blocks_ok=True)
    return resolve("fp8_dequantize", backend, q.device)(q, s, g, out_dtype)


def fp8_gemm(x_q: torch.Tensor, x_s: torch.Tensor, w_q: torch.Tensor, w_s: torch.Tensor,
             out_dtype: torch.dtype = torch.bfloat16, *, backend: str | None = None) -> torch.Tensor:
    """Y [M, N] = dequant(x) @ dequant(w)ᵀ, fp32 accumulation promoted every 128 K (DeepSeek kernel.py).

    x_q [M, K] e4m3fn with x_s [M, ceil(K/128)]; w_q [N, K] e4m3fn with w_s [ceil(N/128), ceil(K/128)]
    (128×128 blocks) or [N, ceil(K/128)] (1×128 tiles, as in the dW GEMM). Strided views are fine
    (e.g. w_q.t(), w_s.t() for the dX GEMM). out_dtype: torch.bfloat16 or torch.float32.
    """
    _quantised_arg("fp8_gemm", "x_q", x_q, "x_s", x_s, blocks_ok=False)
    b_group = _quantised_arg("fp8_gemm", "w_q", w_q, "w_s", w_s, blocks_ok=True)
    K = x_q.shape[1]
    check(w_q.shape[1] == K, "fp8_gemm: w_q", f"a tensor [N, K={K}] (K as in x_q)", w_q)
    check(w_q.device == x_q.device, "fp8_gemm: w_q", f"a tensor on x_q's device ({x_q.device})", w_q.device)
    _out_dtype_arg("fp8_gemm", out_dtype)
    return resolve("fp8_gemm", backend, x_q.device)(x_q, x_s, w_q, w_s, b_group, out_dtype)


def fp8_grouped_gemm(x_q: torch.Tensor, x_s: torch.Tensor, w_q: torch.Tensor, w_s: torch.Tensor,
                     offsets: torch.Tensor, out_dtype: torch.dtype = torch.bfloat16, *,
                     backend: str | None = None) -> torch.Tensor:
    """Y[offs[e]:offs[e+1]] = dequant(x rows) @ dequant(w[e])ᵀ for the contiguous (expert-sorted) layout.

    x_q [M, K], x_s [M, ceil(K/128)]; w_q [E, N, K], w_s [E, ceil(N/128), ceil(K/128)] (from
    quantize_weight on [E, N, K]); offsets int64 [E+1] with offsets[0] = 0, offsets[E] = M
    (moe routing's offsets_E1). Segments may have any length, 0 included: no 128-row alignment.
    """
    _quantised_arg("fp8_grouped_gemm", "x_q", x_q, "x_s", x_s, blocks_ok=False)
    M, K = x_q.shape
    tensor_arg("fp8_grouped_gemm: w_q", w_q, dtypes=(FP8,), shape=(None, None, K),
               what=f"a float8_e4m3fn tensor [E, N, K={K}]")
    E, N, _ = w_q.shape
    tensor_arg("fp8_grouped_gemm: w_s", w_s, dtypes=(torch.float32,), shape=(E, cdiv(N, BLOCK), cdiv(K, BLOCK)),
               what=f"a float32 tensor [E={E}, ceil({N}/128)={cdiv(N, BLOCK)}, ceil({K}/128)={cdiv(K, BLOCK)}]")
    for name, t in (("w_q", w_q), ("w_s", w_s)):
        check(t.device == x_q.device, f"fp8_grouped_gemm: {name}", f"a tensor on x_q's device ({x_q.device})",
              t.device)
    offsets_arg("fp8_grouped_gemm: offsets", offsets, E, M, x_q.device)
    _out_dtype_arg("fp8_grouped_gemm", out_dtype)
    return resolve("fp8_grouped_gemm", backend, x_q.device)(x_q, x_s, w_q, w_s, offsets, out_dtype)
