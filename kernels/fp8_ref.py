"""Plain-PyTorch references for the FP8 (e4m3fn) block-scaled recipe of DeepSeek-V3.

Every FP8 backend (the Triton kernels in `fp8.py`, the "torch" fast path in `kdarch.ops.fp8.torch_backend`) is
tested and benchmarked against these functions, so they favour being obviously right over being
fast: tiles are made with reshape + padding, e4m3 rounding is torch's own cast (round to nearest
even, saturating at ±448 — checked against a grid search in the tests), GEMMs run in fp64.

The recipe (DeepSeek-V3 tech report §3.3, inference/kernel.py):
  * a tile is `group_rows × 128` elements: 1×128 for activations and gradients (one scale per row
    per 128 columns), 128×128 for weights; the last tile of a row / column may be partial (K or N
    not a multiple of 128): it is quantised from its valid elements only, nothing is padded in
    memory and nothing is refused;
  * scale = max(amax, amax_floor) / 448, so a tile's largest |value| lands on 448 and an all-zero
    tile gets a finite scale and zero values (never 0/0); with `pow2_scale` the scale is rounded
    up to a power of two (UE8M0-style), which makes x / scale and the dequantisation exact;
  * q = e4m3(x / scale), round to nearest even; dequant(q) = q * scale;
  * a tile holding any inf or NaN is poisoned on purpose: its scale is NaN and every value is the
    e4m3fn NaN (0x7F), so it dequantises to NaN and every GEMM output it touches is NaN, the
    overflow signal a training loop checks for. Other tiles are untouched.
  * GEMM: C = Σ_kb (A_kb @ B_kbᵀ) · a_s[:, kb] · b_s[:, kb] over 128-wide K blocks, fp32
    accumulation; the reference computes dequant(A) @ dequant(B)ᵀ in fp64 instead (the exact
    value the kernels approximate to fp32 accumulation error).

Legend: R rows, C columns of a quantised matrix (tiles run along C); M, N, K a GEMM's
out-rows / out-cols / reduction (C = A[M, K] · B[N, K]ᵀ); RT, CT, MT, NT, KT tile counts
(ceil(dim / 128)); E experts (groups); G rows per scale group (1 or 128).
"""

from __future__ import annotations

import torch

E4M3_MAX = 448.0
BLOCK = 128
AMAX_FLOOR = 1e-4  # DeepSeek's max(amax, 1e-4): activations and weights
GRAD_AMAX_FLOOR = 1e-20  # gradients are small; this only guards all-zero tiles and keeps scales normal fp32
E4M3_NAN_BYTE = 0x7F


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _tiles(x_RC: torch.Tensor, group_rows: int) -> torch.Tensor:
    """fp32 [RT, G, CT, 128] tile view of x, zero-padded when R or C is not a multiple of the tile
    (zeros never change a tile's amax; the padding is cropped again from every result)."""
    R, C = x_RC.shape
    RT, CT = cdiv(R, group_rows), cdiv(C, BLOCK)
    if (RT * group_rows, CT * BLOCK) == (R, C):
        return x_RC.float().reshape(RT, group_rows, CT, BLOCK)
    pad = x_RC.new_zeros(RT * group_rows, CT * BLOCK, dtype=torch.float32)
    pad[:R, :C] = x_RC
    return pad.view(RT, group_rows, CT, BLOCK)


def expand_scales(s_TT: torch.Tensor, group_rows: int, R: int, C: int) -> torch.Tensor:
    """Per-element [R, C] view of tile scales [RT, CT] (each scale repeated over its tile)."""
    return s_TT.repeat_interleave(group_rows, 0)[:R].repeat_interleave(BLOCK, 1)[:, :C]


def pow2_ceil(s: torch.Tensor) -> torch.Tensor:
    """Smallest power of two ≥ s, for positive normal fp32 s (frexp: s = m·2^e, m ∈ [0.5, 1))."""
    m, e = torch.frexp(s)
    return torch.where(m == 0.5, s, torch.ldexp(torch.ones_like(s), e))


def quantize_ref(x_RC: torch.Tensor, group_rows: int, amax_floor: float = AMAX_FLOOR, pow2_scale: bool = False):
    """Quantise x [R, C] in group_rows×128 tiles -> (q e4m3fn [R, C], scales fp32 [RT, CT])."""
    R, C = x_RC.shape
    t = _tiles(x_RC, group_rows)  # [RT, G, CT, 128]
    bad_T = (t * 0).sum(dim=3).isnan().any(dim=1)  # [RT, CT]: inf·0 and NaN·0 are NaN
    lo, hi = t.aminmax(dim=3)
    amax_T = torch.maximum(-lo, hi).amax(dim=1)  # NaN / inf in bad tiles, whose scale is NaN anyway
    s_T = amax_T.clamp_min(amax_floor) / E4M3_MAX
    if pow2_scale:
        s_T = pow2_ceil(s_T)
    s_T = torch.where(bad_T, float("nan"), s_T)
    q = (t / s_T[:, None, :, None]).to(torch.float8_e4m3fn).view(torch.uint8)
    q = torch.where(bad_T[:, None, :, None], E4M3_NAN_BYTE, q).view(torch.float8_e4m3fn)
    return q.view(t.shape[0] * group_rows, -1)[:R, :C].contiguous(), s_T


def quantize_act_ref(x_MK, amax_floor: float = AMAX_FLOOR, pow2_scale: bool = False):
    """1×128 tiles along K: (q [M, K], s [M, KT])."""
    return quantize_ref(x_MK, 1, amax_floor, pow2_scale)


def quantize_weight_ref(w_NK, amax_floor: float = AMAX_FLOOR, pow2_scale: bool = False):
    """128×128 blocks: (q [N, K], s [NT, KT])."""
    return quantize_ref(w_NK, BLOCK, amax_floor, pow2_scale)


def scale_group_rows(R: int, s_rows: int) -> int:
    """Rows per scale (1 or 128) from the scale matrix's row count; R = 1 is both (and means the same)."""
    if s_rows == R:
        return 1
    if s_rows == cdiv(R, BLOCK):
        return BLOCK
    raise ValueError(f"scales have {s_rows} rows; for a matrix of {R} rows expected {R} (1×128 tiles) "
                     f"or {cdiv(R, BLOCK)} (128×128 blocks)")


def dequantize_ref(q_RC: torch.Tensor, s_TT: torch.Tensor, group_rows: int | None = None) -> torch.Tensor:
    """q * scale in fp32 [R, C]; the tile shape is read from the scale shape unless given."""
    R, C = q_RC.shape
    g = group_rows or scale_group_rows(R, s_TT.shape[0])
    return q_RC.float() * expand_scales(s_TT.float(), g, R, C)


def fp8_gemm_ref(a_q_MK, a_s, b_q_NK, b_s, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """dequant(A) @ dequant(B)ᵀ computed in fp64, returned in out_dtype. B's scales may be 128×128 or 1×128."""
    a = dequantize_ref(a_q_MK, a_s).double()
    b = dequantize_ref(b_q_NK, b_s).double()
    return (a @ b.T).to(out_dtype)


def fp8_grouped_gemm_ref(a_q_MK, a_s, b_q_ENK, b_s_E, offs_E1, out_dtype: torch.dtype = torch.float32):
    """Rows offs[e]:offs[e+1] of A times expert e's B, in fp64 (a loop over experts)."""
    out = torch.zeros(a_q_MK.shape[0], b_q_ENK.shape[1], dtype=torch.float64, device=a_q_MK.device)
    o = offs_E1.tolist()
    for e in range(b_q_ENK.shape[0]):
        if o[e + 1] > o[e]:
            out[o[e]:o[e + 1]] = fp8_gemm_ref(a_q_MK[o[e]:o[e + 1]], a_s[o[e]:o[e + 1]], b_q_ENK[e], b_s_E[e],
                                              torch.float64)
    return out.to(out_dtype)


def fp8_kgrouped_gemm_ref(a_q_NM, a_s, b_q_KM, b_s, offs_E1, out_dtype: torch.dtype = torch.float32):
    """Per expert e: A[:, seg_e] @ B[:, seg_e]ᵀ -> [E, N, K] (the weight gradient of a grouped linear).

    A [N, M] and B [K, M] are quantised in 1×128 tiles along the token dimension M (global tiles: a
    tile may straddle two experts' segments; each expert uses only its own columns)."""
    a, b = dequantize_ref(a_q_NM, a_s).double(), dequantize_ref(b_q_KM, b_s).double()
    o = offs_E1.tolist()
    return torch.stack([a[:, o[e]:o[e + 1]] @ b[:, o[e]:o[e + 1]].T for e in range(len(o) - 1)]).to(out_dtype)


# ---- helpers shared by tests and benchmarks ----

def rel_err(x: torch.Tensor, ref_: torch.Tensor) -> float:
    """Relative Frobenius error ‖x − ref‖ / ‖ref‖, in fp64."""
    x, ref_ = x.double(), ref_.double()
    return ((x - ref_).norm() / ref_.norm().clamp_min(1e-300)).item()


def e4m3_half_ulp(y: torch.Tensor) -> torch.Tensor:
    """Half the e4m3 grid spacing at |y| (y in scaled units, |y| ≤ 448): the worst RNE error there."""
    a = y.double().abs()
    binade = torch.floor(torch.log2(a.clamp_min(2.0 ** -6)))  # subnormals share the 2^-6 spacing
    return torch.exp2(binade - 4)
