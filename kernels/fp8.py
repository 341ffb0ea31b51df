"""Triton kernels for DeepSeek-V3's FP8 recipe: tile quantisation, dequantisation, block-scaled GEMM.

The semantics (tiles, scales, rounding, inf/NaN poisoning) are defined by `fp8_ref.py`; these
kernels are tested bit-exact against it for quantisation and to fp32-accumulation error for GEMMs.

Why e4m3 rounding is done with integer arithmetic here: casting fp32 -> e4m3 inside a kernel is
wrong under TRITON_INTERPRET=1 (mantissa carries are dropped, inf/NaN and values ≥ 464 mangled),
and a GPU cast depends on the architecture's conversion instruction. `_e4m3_bits` computes the
e4m3fn bit pattern itself (round to nearest even, saturate to ±448, NaN -> 0x7F) from the fp32
bits, and the kernels store bytes through a uint8 view of the fp8 output, so the result is the same
bits in the interpreter and on any GPU. The same holds for reading (`_e4m3_value`) and for the bf16
GEMM epilogue (`_round_to_bf16` makes the final cast exact). Divisions use `div_rn` (IEEE) because
Triton's `/` is an approximate division on NVIDIA GPUs.

One GEMM kernel serves every FP8 product of the forward and backward passes, C = A·Bᵀ with A's
scales per row and per 128 K (1×128 tiles) and B's scales either per 128×128 block (weights) or
per row (activations quantised along the token dim, for dW). MODE selects the grouping:
  0 dense      C[M, N]        = A[M, K] · B[N, K]ᵀ
  1 M-grouped  C[seg_e, N]    = A[seg_e, K] · B[e, N, K]ᵀ   (expert forward / dgrad, contiguous
               layout, ragged segments: a tile map assigns every BLOCK_M row tile to one expert)
  2 K-grouped  C[e, M, N]     = A[M, seg_e] · B[N, seg_e]ᵀ   (expert wgrad; K is the token dim)
Each K step is one 128-wide scale block: acc += dot(a, b) · a_s · b_s (DeepSeek kernel.py), so the
fp32 accumulator is promoted every 128 K elements.

Legend: R, C rows / cols of a quantised matrix; M, N, K GEMM out-rows, out-cols, reduction;
E experts; T row tiles of the grouped tile map; *_s a scale tensor.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kdarch.kernels import triton_interpreting
from kdarch.kernels.fp8_ref import BLOCK, cdiv


@triton.jit
def _e4m3_bits(y):
    """fp32 -> e4m3fn bit pattern (int32 in [0, 255]): RNE, saturating to ±448, NaN -> 0x7F."""
    b = y.to(tl.int32, bitcast=True)
    sign = (b >> 24) & 0x80
    a = tl.minimum(b & 0x7FFFFFFF, 0x43E00000)  # |y| bits, inf and > 448 clamp to 448 (NaN handled below)
    # normal range (|y| ≥ 2^-6): keep 3 mantissa bits with ties to even, rebias the exponent 127 -> 7
    r = a + 0x7FFFF + ((a >> 20) & 1)
    normal = (r >> 20) - ((127 - 7) << 3)
    # subnormal range: units of 2^-9; adding 1.5·2^23 makes the fp32 adder round to an integer (RNE)
    sub = ((a.to(tl.float32, bitcast=True) * 512.0 + 12582912.0).to(tl.int32, bitcast=True)) & 0xF
    mag = tl.where(a < 0x3C800000, sub, normal)
    return tl.where((b & 0x7FFFFFFF) > 0x7F800000, 0x7F, mag | sign)


@triton.jit
def _e4m3_value(byte):
    """e4m3fn bit pattern (int32) -> fp32 value, NaN for 0x7F / 0xFF."""
    e = (byte >> 3) & 0xF
    m = byte & 0x7
    normal = (((byte & 0x80) << 24) | ((e + 120) << 23) | (m << 20)).to(tl.float32, bitcast=True)
    sub = tl.where(byte >= 0x80, -1.0, 1.0) * m.to(tl.float32) * 0.001953125  # m · 2^-9
    val = tl.where(e == 0, sub, normal)
    return tl.where((byte & 0x7F) == 0x7F, float("nan"), val)


@triton.jit
def _round_to_bf16(x):
    """Round fp32 to the nearest-even bf16 value (still fp32), so the cast to bf16 is exact everywhere."""
    b = x.to(tl.int32, bitcast=True)
    r = ((b + 0x7FFF + ((b >> 16) & 1)) & -65536).to(tl.float32, bitcast=True)
    return tl.where(x == x, r, x)


@triton.jit
def _tile_ptrs(rows, cols, R, C, s_r, s_c):
    mask = (rows < R)[:, None] & (cols < C)[None, :]
    return rows[:, None] * s_r + cols[None, :] * s_c, mask


@triton.jit
def _quant_kernel(x_ptr, q_ptr, s_ptr, R, C, s_xe, s_xr, s_xc, s_qe, s_qr, s_se, s_sr, amax_floor,
                  GROUP_R: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, POW2: tl.constexpr):
    """One program: BLOCK_R rows × one 128-column tile of matrix program_id(2) (an expert's weight, or the
    only one); a scale per row (GROUP_R=1) or one per block (GROUP_R=BLOCK_R=128)."""
    e = tl.program_id(2).to(tl.int64)
    x_ptr += e * s_xe
    q_ptr += e * s_qe
    s_ptr += e * s_se
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    offs, mask = _tile_ptrs(rows, cols, R, C, s_xr, s_xc)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    bad = (x.to(tl.int32, bitcast=True) & 0x7FFFFFFF) >= 0x7F800000  # inf or NaN
    amax = tl.max(tl.where(bad, 0.0, tl.abs(x)), axis=1)  # [BLOCK_R]
    nbad = tl.max(bad.to(tl.int32), axis=1)
    if GROUP_R > 1:
        amax = tl.zeros_like(amax) + tl.max(amax, axis=0)
        nbad = tl.zeros_like(nbad) + tl.max(nbad, axis=0)
    s = tl.math.div_rn(tl.maximum(amax, amax_floor), 448.0)
    if POW2:  # round the scale up to a power of two: bump the exponent if any mantissa bit is set
        s = ((s.to(tl.int32, bitcast=True) + 0x7FFFFF) & 0x7F800000).to(tl.float32, bitcast=True)
    s = tl.where(nbad > 0, float("nan"), s)
    q = _e4m3_bits(tl.math.div_rn(x, s[:, None]))
    q_offs, _ = _tile_ptrs(rows, cols, R, C, s_qr, 1)
    tl.store(q_ptr + q_offs, q.to(tl.uint8), mask=mask)
    if GROUP_R == 1:
        tl.store(s_ptr + rows * s_sr + tl.program_id(1), s, mask=rows < R)
    else:
        lane = tl.arange(0, BLOCK_R)  # every lane holds the block's scale; lane 0 writes it
        tl.store(s_ptr + tl.program_id(0) * s_sr + tl.program_id(1) + lane * 0, s, mask=lane == 0)


@triton.jit
def _dequant_kernel(q_ptr, s_ptr, y_ptr, R, C, s_qr, s_qc, s_sr, s_yr,
                    GROUP_R: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    offs, mask = _tile_ptrs(rows, cols, R, C, s_qr, s_qc)
    q = _e4m3_value(tl.load(q_ptr + offs, mask=mask, other=0).to(tl.int32))
    s = tl.load(s_ptr + (rows // GROUP_R) * s_sr + tl.program_id(1), mask=rows < R, other=1.0)
    y_offs, _ = _tile_ptrs(rows, cols, R, C, s_yr, 1)
    tl.store(y_ptr + y_offs, q * s[:, None], mask=mask)


@triton.jit
def _fp8_gemm_kernel(a_ptr, b_ptr, c_ptr, as_ptr, bs_ptr, offs_ptr, tile_g_ptr, tile_m_ptr,
                     M, N, K,
                     s_am, s_ak, s_bg, s_bn, s_bk, s_cg, s_cm, s_cn,
                     s_asm, s_ask, s_bsg, s_bsn, s_bsk,
                     MODE: tl.constexpr, B_GROUP: tl.constexpr, OUT_BF16: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    m0, m_hi, k_lo, k_hi = pid_m * BLOCK_M, M, 0, K
    if MODE == 1:  # M-grouped: this row tile belongs to expert g (g < 0: a spare tile, no work)
        g = tl.load(tile_g_ptr + pid_m)
        m0 = tl.load(tile_m_ptr + pid_m).to(tl.int32)
        m_hi = tl.where(g >= 0, tl.load(offs_ptr + tl.maximum(g, 0) + 1).to(tl.int32), m0)
        k_hi = tl.where(g >= 0, K, 0)
        b_ptr += tl.maximum(g, 0).to(tl.int64) * s_bg
        bs_ptr += tl.maximum(g, 0).to(tl.int64) * s_bsg
    if MODE == 2:  # K-grouped: reduce over expert g's token segment only
        g = tl.program_id(2)
        k_lo = tl.load(offs_ptr + g).to(tl.int32)
        k_hi = tl.load(offs_ptr + g + 1).to(tl.int32)
        c_ptr += g.to(tl.int64) * s_cg
    offs_m = (m0 + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    mask_m, mask_n = offs_m < m_hi, offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kt in range(k_lo // BLOCK_K, tl.cdiv(k_hi, BLOCK_K)):
        offs_k = (kt * BLOCK_K + tl.arange(0, BLOCK_K)).to(tl.int64)  # int64 addressing throughout
        mask_k = (offs_k >= k_lo) & (offs_k < k_hi)
        a = tl.load(a_ptr + offs_m[:, None] * s_am + offs_k[None, :] * s_ak,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        b = tl.load(b_ptr + offs_n[None, :] * s_bn + offs_k[:, None] * s_bk,
                    mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        a_s = tl.load(as_ptr + offs_m * s_asm + kt * s_ask, mask=mask_m, other=1.0)
        b_s = tl.load(bs_ptr + (offs_n // B_GROUP) * s_bsn + kt * s_bsk, mask=mask_n, other=1.0)
        acc += tl.dot(a, b) * a_s[:, None] * b_s[None, :]
    if OUT_BF16:
        acc = _round_to_bf16(acc)
    c_offs = offs_m[:, None] * s_cm + offs_n[None, :] * s_cn
    tl.store(c_ptr + c_offs, acc.to(c_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


# ----------------------------------------------------------------------------------------------
# launchers (inputs already validated by the kdarch.ops.fp8 functional API)
# ----------------------------------------------------------------------------------------------

def quantize(x: torch.Tensor, group_rows: int, amax_floor: float, pow2_scale: bool):
    """x [(E,) R, C], any strides -> (q e4m3fn, same shape, contiguous; s fp32 [(E,) ceil(R/G), ceil(C/128)])."""
    x3 = x if x.dim() == 3 else x[None]
    E, R, C = x3.shape
    q = torch.empty((E, R, C), dtype=torch.float8_e4m3fn, device=x.device)
    s = torch.empty((E, cdiv(R, group_rows), cdiv(C, BLOCK)), dtype=torch.float32, device=x.device)
    if q.numel():
        block_r = BLOCK if group_rows > 1 else (128 if triton_interpreting() else 32)
        grid = (cdiv(R, block_r), cdiv(C, BLOCK), E)
        _quant_kernel[grid](x3, q.view(torch.uint8), s, R, C, *x3.stride(), q.stride(0), q.stride(1), s.stride(0),
                            s.stride(1), float(amax_floor), GROUP_R=group_rows, BLOCK_R=block_r, BLOCK_C=BLOCK,
                            POW2=bool(pow2_scale))
    return (q, s) if x.dim() == 3 else (q[0], s[0])


def dequantize(q_RC: torch.Tensor, s: torch.Tensor, group_rows: int, out_dtype: torch.dtype = torch.float32):
    R, C = q_RC.shape
    y = torch.empty((R, C), dtype=torch.float32, device=q_RC.device)
    if y.numel():
        block_r = 128 if (group_rows > 1 or triton_interpreting()) else 32
        _dequant_kernel[(cdiv(R, block_r), cdiv(C, BLOCK))](
            q_RC.view(torch.uint8), s, y, R, C, q_RC.stride(0), q_RC.stride(1), s.stride(0), y.stride(0),
            GROUP_R=group_rows, BLOCK_R=block_r, BLOCK_C=BLOCK)
    return y.to(out_dtype)


def _blocks(M: int, N: int):
    """(BLOCK_M, BLOCK_N, launch kwargs): big tiles under the interpreter (its cost is per program)."""
    if triton_interpreting():
        return (max(16, min(256, triton.next_power_of_2(M))), max(16, min(256, triton.next_power_of_2(N))), {})
    return (64 if M <= 64 else 128), 128, {"num_warps": 8 if M > 64 else 4, "num_stages": 3}


def _launch(a, b, c, a_s, b_s, b_group, offs, tile_g, tile_m, M, N, K, mode, grid_m, grid_g, block_m, block_n, kw):
    b3, bs3 = (b, b_s) if b.dim() == 3 else (b[None], b_s[None])  # expert dim first (size 1 if dense)
    c3 = c if c.dim() == 3 else c[None]
    dummy = a_s  # unused pointer slots
    _fp8_gemm_kernel[(grid_m, cdiv(N, block_n), grid_g)](
        a, b, c, a_s, b_s, offs if offs is not None else dummy, tile_g if tile_g is not None else dummy,
        tile_m if tile_m is not None else dummy, M, N, K,
        a.stride(0), a.stride(1), b3.stride(0), b3.stride(1), b3.stride(2), c3.stride(0), c3.stride(1), c3.stride(2),
        a_s.stride(0), a_s.stride(1), bs3.stride(0), bs3.stride(1), bs3.stride(2),
        MODE=mode, B_GROUP=b_group, OUT_BF16=c.dtype == torch.bfloat16, BLOCK_M=block_m, BLOCK_N=block_n,
        BLOCK_K=BLOCK, **kw)
    return c


def fp8_gemm(a_q_MK, a_s, b_q_NK, b_s, b_group: int, out_dtype: torch.dtype):
    """C [M, N] = A · Bᵀ, block-scaled; operands may be strided views (e.g. a transposed weight)."""
    M, K = a_q_MK.shape
    N = b_q_NK.shape[0]
    c = torch.empty((M, N), dtype=out_dtype, device=a_q_MK.device)
    if c.numel():
        bm, bn, kw = _blocks(M, N)
        _launch(a_q_MK, b_q_NK, c, a_s, b_s, b_group, None, None, None, M, N, K, 0, cdiv(M, bm), 1, bm, bn, kw)
    return c


def grouped_tile_map(offs_E1: torch.Tensor, M: int, block_m: int):
    """Assign every BLOCK_M row tile of every expert segment to one program, on device, without a sync.

    Returns (tile_g [T] int32: the tile's expert or -1 for a spare slot, tile_m [T] int64: its first
    row), T = ceil(M / BLOCK_M) + E, an upper bound on the number of tiles of any segmentation."""
    E = offs_E1.numel() - 1
    tiles_E = (offs_E1.diff() + block_m - 1) // block_m
    ends_E = tiles_E.cumsum(0)
    t_T = torch.arange(cdiv(M, block_m) + E, device=offs_E1.device)
    g_T = torch.searchsorted(ends_E, t_T, right=True)
    gc_T = g_T.clamp(max=E - 1)
    tile_m = offs_E1[gc_T] + (t_T - (ends_E[gc_T] - tiles_E[gc_T])) * block_m
    return torch.where(g_T < E, gc_T, -1).to(torch.int32), tile_m


def fp8_grouped_gemm(a_q_MK, a_s, b_q_ENK, b_s_E, offs_E1, out_dtype: torch.dtype):
    """C[seg_e] = A[seg_e] · B[e]ᵀ for contiguous, ragged expert segments offs[e]:offs[e+1]."""
    M, K = a_q_MK.shape
    E, N = b_q_ENK.shape[:2]
    c = torch.empty((M, N), dtype=out_dtype, device=a_q_MK.device)
    if c.numel() and E:
        bm, bn, kw = _blocks(M, N)
        bm = min(bm, 64)  # segments are short; spare tiles cost one program each
        tile_g, tile_m = grouped_tile_map(offs_E1, M, bm)
        _launch(a_q_MK, b_q_ENK, c, a_s, b_s_E, BLOCK, offs_E1, tile_g, tile_m, M, N, K, 1, tile_g.numel(), 1,
                bm, bn, kw)
    return c


def fp8_kgrouped_gemm(a_q_NM, a_s, b_q_KM, b_s, offs_E1, out_dtype: torch.dtype):
    """C[e] [N, K] = A[:, seg_e] · B[:, seg_e]ᵀ; A and B quantised in 1×128 tiles along the token dim M."""
    N, M = a_q_NM.shape
    K = b_q_KM.shape[0]
    E = offs_E1.numel() - 1
    c = torch.empty((E, N, K), dtype=out_dtype, device=a_q_NM.device)
    if c.numel():
        bm, bn, kw = _blocks(N, K)
        _launch(a_q_NM, b_q_KM, c, a_s, b_s, 1, offs_E1, None, None, N, K, M, 2, cdiv(N, bm), E, bm, bn, kw)
    return c
