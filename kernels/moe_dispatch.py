"""Triton kernels for dropless MoE expert dispatch: routing metadata, gather-GEMM, combine; forward and backward.

Why this shape (ScatterMoE-style): the T*K (token, slot) rows are only *sorted by index*; no padded,
expert-sorted copy of the activations is ever built. Each grouped-GEMM row tile belongs to one expert
(the tile -> expert map is derived inside the kernel from the int64 offsets) and gathers its rows from
x by index while loading. SwiGLU is fused into the gate/up GEMM's epilogue (it writes silu(gate)*up*w
and keeps the [M, 2I] pre-activation for backward), and its derivative into the epilogue of the
backward GEMM dY @ W_down, which also yields the routing-weight gradient <dY W_down, act>.

Determinism: no float atomics anywhere. The metadata is a counting sort (histogram -> scan -> scatter,
stable: token order kept inside each expert); the combine sums each token's K rows (found through the
inverse permutation) in fp32 in slot order; dW reduces each expert's segment in row order inside one
program; the routing-weight gradient's partial sums over I tiles are summed in a fixed order.
Index arithmetic: every row / expert base offset goes through `_row_base` (int64), so tensors past
2^31 elements are addressed right; `row_offsets` exposes that helper to tests.

Legend: T tokens, K slots per token (top-k), E experts, H hidden, I expert intermediate, M = T*K routed
rows (in expert order unless named "slot"), NB row blocks of the metadata kernels; in one GEMM
C[M, N] = A[M, D] @ B_e[D, N]; BLOCK_* are tile sizes, E_PAD = next power of two >= E.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kdarch.kernels import triton_interpreting

PLAIN, SWIGLU_FWD, SWIGLU_BWD = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)  # grouped-GEMM epilogues
# Triton 3.9's interpreter casts fp32 -> bf16 by truncation (GPUs round to nearest even): round explicitly there.
_ROUND_BF16 = tl.constexpr(triton_interpreting())


# ----------------------------------------------------------------------------------------- helpers
@triton.jit
def _row_base(row, stride):
    """int64 element offset of `row` (a row index, an expert id, ...) in a tensor with that row stride."""
    return row.to(tl.int64) * stride


@triton.jit
def _cast(x, dtype: tl.constexpr):
    """x.to(dtype), rounding to nearest even also where the interpreter would truncate to bf16."""
    if _ROUND_BF16 and dtype == tl.bfloat16:
        bits = x.to(tl.float32).to(tl.int32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
        x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def _tile_segment(offsets_ptr, pid_m, E, BLOCK_M: tl.constexpr, E_PAD: tl.constexpr):
    """Row tile `pid_m` of the expert-grouped rows -> (expert, first row, segment end); expert >= E past the end.

    Expert e owns rows offsets[e]:offsets[e+1] and cdiv(count, BLOCK_M) tiles, numbered in expert order.
    """
    e_E = tl.arange(0, E_PAD)
    lo_E = tl.load(offsets_ptr + e_E, mask=e_E < E, other=0)
    hi_E = tl.load(offsets_ptr + e_E + 1, mask=e_E < E, other=0)
    tiles_E = (hi_E - lo_E + BLOCK_M - 1) // BLOCK_M
    tile_end_E = tl.cumsum(tiles_E, 0)
    expert = tl.sum((tile_end_E <= pid_m).to(tl.int32), 0)
    sel_E = e_E == expert
    first_tile = tl.sum(tl.where(sel_E, tile_end_E - tiles_E, 0), 0)
    start = tl.sum(tl.where(sel_E, lo_E, 0), 0) + (pid_m - first_tile) * BLOCK_M
    return expert, start, tl.sum(tl.where(sel_E, hi_E, 0), 0)


@triton.jit
def _row_offsets_kernel(rows_ptr, out_ptr, n, stride, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    rows = tl.load(rows_ptr + offs, mask=offs < n)
    tl.store(out_ptr + offs, _row_base(rows, stride), mask=offs < n)


# ------------------------------------------------------------------------- routing metadata kernels
@triton.jit
def _histogram_kernel(ids_ptr, hist_ptr, M, E, BLOCK_M: tl.constexpr, E_PAD: tl.constexpr):
    """hist[b, e] = #rows of block b routed to expert e."""
    pid = tl.program_id(0)
    m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    ids_M = tl.load(ids_ptr + m, mask=m < M, other=-1)
    e_E = tl.arange(0, E_PAD)
    hist_E = tl.sum((ids_M[:, None] == e_E[None, :]).to(tl.int32), 0)
    tl.store(hist_ptr + pid * E + e_E, hist_E, mask=e_E < E)


@triton.jit
def _scan_kernel(hist_ptr, counts_ptr, offsets_ptr, NB, E, PAD, BLOCK_B: tl.constexpr, E_PAD: tl.constexpr):
    """One program: counts, (padded) segment offsets, and hist[b, e] := first sorted position of block b's e-rows."""
    e_E = tl.arange(0, E_PAD)
    emask = e_E < E
    counts_E = tl.zeros([E_PAD], dtype=tl.int32)
    for b0 in range(0, NB, BLOCK_B):
        b = b0 + tl.arange(0, BLOCK_B)
        h = tl.load(hist_ptr + b[:, None] * E + e_E[None, :], mask=(b < NB)[:, None] & emask[None, :], other=0)
        counts_E += tl.sum(h, 0)
    seg_E = (counts_E + PAD - 1) // PAD * PAD
    seg_end_E = tl.cumsum(seg_E, 0)
    tl.store(counts_ptr + e_E, counts_E.to(tl.int64), mask=emask)
    tl.store(offsets_ptr + 1 + e_E, seg_end_E.to(tl.int64), mask=emask)
    tl.store(offsets_ptr + e_E, tl.zeros([E_PAD], dtype=tl.int64), mask=e_E == 0)
    carry_E = seg_end_E - seg_E
    for b0 in range(0, NB, BLOCK_B):
        b = b0 + tl.arange(0, BLOCK_B)
        ptrs = hist_ptr + b[:, None] * E + e_E[None, :]
        bmask = (b < NB)[:, None] & emask[None, :]
        h = tl.load(ptrs, mask=bmask, other=0)
        incl = tl.cumsum(h, 0)
        tl.store(ptrs, carry_E[None, :] + incl - h, mask=bmask)
        carry_E += tl.sum(h, 0)


@triton.jit
def _scatter_kernel(ids_ptr, base_ptr, sorted_ptr, inv_ptr, M, E, BLOCK_M: tl.constexpr, E_PAD: tl.constexpr):
    """Row m of block b goes to base[b, e] + (its rank among block b's e-rows): a stable counting sort."""
    pid = tl.program_id(0)
    m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    ids_M = tl.load(ids_ptr + m, mask=m < M, other=-1)
    e_E = tl.arange(0, E_PAD)
    hot_ME = (ids_M[:, None] == e_E[None, :]).to(tl.int32)
    base_E = tl.load(base_ptr + pid * E + e_E, mask=e_E < E, other=0)
    pos_M = tl.sum(hot_ME * (tl.cumsum(hot_ME, 0) - hot_ME + base_E[None, :]), 1)
    tl.store(sorted_ptr + pos_M, m.to(tl.int64), mask=m < M)
    tl.store(inv_ptr + m, pos_M.to(tl.int64), mask=m < M)


# -------------------------------------------------------------------------------- gather + sum kernel
@triton.jit
def _gather_sum_kernel(src_ptr, idx_ptr, w_ptr, out_ptr, R, H, K, FAN, stride_src,
                       HAS_W: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr):
    """out[r] = sum_k w[r*K+k] * src[idx[r*K+k] // FAN], in fp32, k ascending; idx < 0 reads as zeros.

    Combine / un-permute: idx = inverse permutation, FAN = 1. Permute: idx = sorted slots, K = 1, FAN = top-k.
    """
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    rmask, hmask = r < R, h < H
    acc = tl.zeros([BLOCK_R, BLOCK_H], dtype=tl.float32)
    for k in range(K):
        j = _row_base(r, K) + k
        slot = tl.load(idx_ptr + j, mask=rmask, other=-1)
        ok = slot >= 0  # before the division: integer division truncates toward zero
        v = tl.load(src_ptr + _row_base(slot // FAN, stride_src)[:, None] + h[None, :],
                    mask=ok[:, None] & hmask[None, :], other=0.0).to(tl.float32)
        if HAS_W:
            v *= tl.load(w_ptr + j, mask=rmask, other=0.0).to(tl.float32)[:, None]
        acc += v
    tl.store(out_ptr + _row_base(r, H)[:, None] + h[None, :], _cast(acc, out_ptr.dtype.element_ty),
             mask=rmask[:, None] & hmask[None, :])


# ------------------------------------------------------------------------------ grouped GEMM kernels
@triton.jit
def _grouped_gemm_kernel(a_ptr, b_ptr, c_ptr, offsets_ptr, idx_ptr, w_ptr, h_ptr, aux_ptr, gw_ptr,
                         N, D, E, FAN, stride_am, stride_be, stride_bd, stride_bn,
                         EPILOGUE: tl.constexpr, GATHER_A: tl.constexpr, DOT_F32: tl.constexpr,
                         PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_D: tl.constexpr, E_PAD: tl.constexpr):
    """C[j] = A[row(j)] @ B_e for the rows j of expert e; row(j) = idx[j] // FAN (gathered) or j.

    Epilogues (N = I for the SwiGLU ones; idx[j] is row j's slot t*K+k, w the [M] slot-ordered weights):
      PLAIN       C [M, N] = acc.
      SWIGLU_FWD  second accumulator over B columns N + n (the up rows); h [M, 2N] = (gate, up) pre-activations,
                  C [M, N] = silu(gate) * up * w.
      SWIGLU_BWD  acc = dY @ W_down_e = d(w*act); reads h; C [M, 2N] = (d gate, d up), aux [M, N] = w*act,
                  gw [M_slot, n tiles] = partial <acc, act> at row idx[j] (the routing-weight gradient).
    """
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    expert, start, end = _tile_segment(offsets_ptr, pid_m, E, BLOCK_M, E_PAD)
    if expert >= E:
        return
    rows = start + tl.arange(0, BLOCK_M)
    rmask = rows < end
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = n < N
    d = tl.arange(0, BLOCK_D)
    if GATHER_A or EPILOGUE != PLAIN:
        slot = tl.load(idx_ptr + rows, mask=rmask, other=0)
    a_rows = rows
    if GATHER_A:
        a_rows = slot // FAN
    a_ptrs = a_ptr + _row_base(a_rows, stride_am)[:, None] + d[None, :]
    b_ptrs = b_ptr + _row_base(expert, stride_be) + d[:, None] * stride_bd + n[None, :] * stride_bn
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dmask = d < D - d0
        a = tl.load(a_ptrs, mask=rmask[:, None] & dmask[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=dmask[:, None] & nmask[None, :], other=0.0)
        if DOT_F32:  # fp32 operands, and bf16 under the interpreter (its bf16 tl.dot is wrong)
            a, b = a.to(tl.float32), b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        if EPILOGUE == SWIGLU_FWD:
            b_up = tl.load(b_ptrs + N * stride_bn, mask=dmask[:, None] & nmask[None, :], other=0.0)
            if DOT_F32:
                b_up = b_up.to(tl.float32)
            acc_up = tl.dot(a, b_up, acc_up, input_precision=PRECISION)
        a_ptrs += BLOCK_D
        b_ptrs += BLOCK_D * stride_bd

    mask = rmask[:, None] & nmask[None, :]
    if EPILOGUE == PLAIN:
        tl.store(c_ptr + _row_base(rows, N)[:, None] + n[None, :], _cast(acc, c_ptr.dtype.element_ty), mask=mask)
    else:
        h_ptrs = h_ptr + _row_base(rows, 2 * N)[:, None] + n[None, :]
        w = tl.load(w_ptr + slot, mask=rmask, other=0.0).to(tl.float32)[:, None]
        if EPILOGUE == SWIGLU_FWD:
            gate, up = _cast(acc, h_ptr.dtype.element_ty), _cast(acc_up, h_ptr.dtype.element_ty)
            tl.store(h_ptrs, gate, mask=mask)
            tl.store(h_ptrs + N, up, mask=mask)
            gate, up = gate.to(tl.float32), up.to(tl.float32)  # the rounded values backward will see
            act = gate * tl.sigmoid(gate) * up * w
            tl.store(c_ptr + _row_base(rows, N)[:, None] + n[None, :], _cast(act, c_ptr.dtype.element_ty), mask=mask)
        else:
            gate = tl.load(h_ptrs, mask=mask, other=0.0).to(tl.float32)
            up = tl.load(h_ptrs + N, mask=mask, other=0.0).to(tl.float32)
            sig = tl.sigmoid(gate)
            silu = gate * sig
            act = silu * up
            tl.store(gw_ptr + _row_base(slot, tl.num_programs(1)) + pid_n, tl.sum(acc * act, 1), mask=rmask)
            tl.store(aux_ptr + _row_base(rows, N)[:, None] + n[None, :], _cast(act * w, aux_ptr.dtype.element_ty),
                     mask=mask)
            g_act = acc * w
            c_ptrs = c_ptr + _row_base(rows, 2 * N)[:, None] + n[None, :]
            tl.store(c_ptrs, _cast(g_act * up * sig * (1 + gate * (1 - sig)), c_ptr.dtype.element_ty), mask=mask)
            tl.store(c_ptrs + N, _cast(g_act * silu, c_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _grouped_wgrad_kernel(a_ptr, b_ptr, c_ptr, offsets_ptr, idx_ptr, N, D, FAN, stride_am, stride_bm,
                          GATHER_A: tl.constexpr, GATHER_B: tl.constexpr, DOT_F32: tl.constexpr,
                          PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_D: tl.constexpr):
    """C[e] [N, D] = A_e^T @ B_e over expert e's rows, reduced in row order (rows gathered by idx // FAN or not)."""
    pid, e = tl.program_id(0), tl.program_id(1)
    n_tiles_d = tl.cdiv(D, BLOCK_D)
    n = (pid // n_tiles_d) * BLOCK_N + tl.arange(0, BLOCK_N)
    d = (pid % n_tiles_d) * BLOCK_D + tl.arange(0, BLOCK_D)
    nmask, dmask = n < N, d < D
    lo, hi = tl.load(offsets_ptr + e), tl.load(offsets_ptr + e + 1)
    acc = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for r0 in range(lo, hi, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)
        rmask = rows < hi
        a_rows, b_rows = rows, rows
        if GATHER_A:
            a_rows = tl.load(idx_ptr + rows, mask=rmask, other=0) // FAN
        if GATHER_B:
            b_rows = tl.load(idx_ptr + rows, mask=rmask, other=0) // FAN
        a = tl.load(a_ptr + _row_base(a_rows, stride_am)[:, None] + n[None, :], mask=rmask[:, None] & nmask[None, :],
                    other=0.0)
        b = tl.load(b_ptr + _row_base(b_rows, stride_bm)[:, None] + d[None, :], mask=rmask[:, None] & dmask[None, :],
                    other=0.0)
        if DOT_F32:
            a, b = a.to(tl.float32), b.to(tl.float32)
        acc = tl.dot(tl.trans(a), b, acc, input_precision=PRECISION)
    tl.store(c_ptr + _row_base(e, N * D) + n[:, None] * D + d[None, :], _cast(acc, c_ptr.dtype.element_ty),
             mask=nmask[:, None] & dmask[None, :])


# ---------------------------------------------------------------------------------------- launchers
def _pow2(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(int(n), 1))))


def _dot_args(t: torch.Tensor) -> dict:
    """fp32 and (interpreter) bf16 operands are multiplied in fp32; fp32 honours torch's TF32 switch."""
    f32 = t.dtype == torch.float32 or (t.dtype == torch.bfloat16 and triton_interpreting())
    tf32 = t.device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32
    return dict(DOT_F32=f32, PRECISION=("tf32" if tf32 else "ieee") if f32 else None)


def _gemm_tiles(interpreted: bool, M: int, N: int, D: int, epilogue=PLAIN) -> dict:
    """Big tiles under the interpreter (its cost is programs x loop steps); on a GPU, tiles that compile for
    sm_90 without register spills (SWIGLU_BWD keeps ~6 live [BLOCK_M, BLOCK_N] tensors: narrower, 8 warps)."""
    if interpreted:
        return dict(BLOCK_M=_pow2(M, 16, 64), BLOCK_N=_pow2(N, 16, 128), BLOCK_D=_pow2(D, 16, 128))
    bwd = epilogue == SWIGLU_BWD
    return dict(BLOCK_M=64, BLOCK_N=_pow2(N, 16, 64 if bwd else 128), BLOCK_D=_pow2(D, 16, 64),
                num_warps=8 if bwd else 4, num_stages=3)


def row_offsets(rows: torch.Tensor, stride: int) -> torch.Tensor:
    """The int64 element offsets rows * stride exactly as the kernels compute them (tests the index arithmetic)."""
    out = torch.empty(rows.shape, dtype=torch.int64, device=rows.device)
    _row_offsets_kernel[(triton.cdiv(rows.numel(), 1024),)](rows, out, rows.numel(), stride, BLOCK=1024)
    return out


def padded_rows(M: int, n_experts: int, pad_to: int) -> int:
    """Static length of the sorted index when each expert's segment is padded to a multiple of pad_to."""
    return M if pad_to == 1 else M + n_experts * (pad_to - 1)


def routing_metadata(topk_ids_TK: torch.Tensor, n_experts: int, pad_to: int = 1, block_m: int | None = None):
    """(counts_E, offsets_E1, sorted_idx, inv_idx_M), int64, as kdarch.kernels.moe_ref.routing_metadata_ref.

    pad_to > 1 rounds every segment up to a multiple of pad_to for aligned-segment kernels: offsets are then
    the padded starts, sorted_idx has padded_rows(M, E, pad_to) entries, -1 in pad slots and the tail.
    block_m (a power of two) overrides the rows per program of the histogram / scatter kernels.
    """
    ids_M = topk_ids_TK.reshape(-1).contiguous()
    M, E, dev = ids_M.numel(), n_experts, ids_M.device
    E_PAD = triton.next_power_of_2(E)
    BLOCK_M = block_m or _pow2(M, 16, max(16, (1 << (18 if triton_interpreting() else 14)) // E_PAD))
    NB = triton.cdiv(M, BLOCK_M)
    counts_E = torch.empty(E, dtype=torch.int64, device=dev)
    offsets_E1 = torch.empty(E + 1, dtype=torch.int64, device=dev)
    sorted_idx = torch.full((padded_rows(M, E, pad_to),), -1, dtype=torch.int64, device=dev)
    inv_idx_M = torch.empty(M, dtype=torch.int64, device=dev)
    hist_BE = torch.zeros(max(NB, 1), E, dtype=torch.int32, device=dev)
    if M:
        _histogram_kernel[(NB,)](ids_M, hist_BE, M, E, BLOCK_M=BLOCK_M, E_PAD=E_PAD)
    _scan_kernel[(1,)](hist_BE, counts_E, offsets_E1, NB, E, pad_to,
                       BLOCK_B=_pow2(NB, 1, max(1, 8192 // E_PAD)), E_PAD=E_PAD)
    if M:
        _scatter_kernel[(NB,)](ids_M, hist_BE, sorted_idx, inv_idx_M, M, E, BLOCK_M=BLOCK_M, E_PAD=E_PAD)
    return counts_E, offsets_E1, sorted_idx, inv_idx_M


def gather_sum(src_XH: torch.Tensor, idx: torch.Tensor, K: int, fan: int = 1, weights=None, out_dtype=None):
    """out[r] = sum_k weights[r, k] * src[idx[r*K+k] // fan] over k in order, fp32 inside; [len(idx) // K, H]."""
    src_XH = src_XH.contiguous()
    R, H = idx.numel() // K, src_XH.shape[1]
    out = torch.empty(R, H, dtype=out_dtype or src_XH.dtype, device=src_XH.device)
    if R == 0 or H == 0:
        return out.zero_()
    interp = triton_interpreting()
    BLOCK_R, BLOCK_H = _pow2(R, 1, 64 if interp else 32), _pow2(H, 16, 1024 if interp else 128)
    w = weights.contiguous() if weights is not None else None
    _gather_sum_kernel[(triton.cdiv(R, BLOCK_R), triton.cdiv(H, BLOCK_H))](
        src_XH, idx, w, out, R, H, K, fan, src_XH.stride(0), HAS_W=weights is not None,
        BLOCK_R=BLOCK_R, BLOCK_H=BLOCK_H)
    return out


def permute(x_TH: torch.Tensor, sorted_idx: torch.Tensor, fan: int) -> torch.Tensor:
    """x rows in expert order: out[j] = x[sorted_idx[j] // fan] (zeros at pad slots). The GEMMs gather
    in-kernel instead; this is for consumers that need the copy (e.g. an all-to-all) and for benchmarks."""
    return gather_sum(x_TH, sorted_idx, 1, fan)


def combine(y_MH: torch.Tensor, inv_idx_M: torch.Tensor, K: int, weights_TK=None, out_dtype=None) -> torch.Tensor:
    """Un-permute + combine: out[t] = sum_k weights[t, k] * y[inv_idx[t*K+k]], fp32, k in order."""
    return gather_sum(y_MH, inv_idx_M, K, 1, weights_TK, out_dtype)


def _gemm(epilogue, a, b_E, offsets_E1, idx, fan, N, D, stride_bd, stride_bn, out, h=None, w=None, aux=None,
          gather=False):
    """Launch _grouped_gemm_kernel; returns the [M_slot, n tiles] routing-weight partials for SWIGLU_BWD."""
    M = idx.numel() if gather or epilogue != PLAIN else a.shape[0]
    E = b_E.shape[0]
    cfg = _gemm_tiles(triton_interpreting(), M, N, D, epilogue)
    grid = (min(triton.cdiv(M, cfg["BLOCK_M"]) + E, M), triton.cdiv(N, cfg["BLOCK_N"]))
    gw = torch.zeros(M, grid[1], dtype=torch.float32, device=a.device) if epilogue == SWIGLU_BWD else None
    if grid[0] and grid[1]:
        _grouped_gemm_kernel[grid](a, b_E, out, offsets_E1, idx, w, h, aux, gw, N, D, E, fan, a.stride(0),
                                   b_E.stride(0), stride_bd, stride_bn, EPILOGUE=epilogue, GATHER_A=gather,
                                   E_PAD=triton.next_power_of_2(E), **_dot_args(a), **cfg)
    return gw


def grouped_gemm(a_XD, b_E, offsets_E1, idx=None, fan=1, trans_b=True):
    """C[j] = A[row(j)] @ (B[e].T if trans_b else B[e]) for each row j of expert e (rows in expert order).

    row(j) = idx[j] // fan when idx is given (a gather inside the GEMM), else j. B: [E, N, D] (trans_b) or [E, D, N].
    """
    a_XD, b_E = a_XD.contiguous(), b_E.contiguous()
    N, D = (b_E.shape[1], b_E.shape[2]) if trans_b else (b_E.shape[2], b_E.shape[1])
    M = idx.numel() if idx is not None else a_XD.shape[0]
    out = torch.empty(M, N, dtype=a_XD.dtype, device=a_XD.device)
    strides = (1, D) if trans_b else (N, 1)
    _gemm(PLAIN, a_XD, b_E, offsets_E1, idx if idx is not None else offsets_E1, fan, N, D, *strides, out,
          gather=idx is not None)
    return out


def grouped_wgrad(a_XN, b_XD, offsets_E1, idx, fan=1, gather_a=False, gather_b=False, n_experts=None, out_dtype=None):
    """dW[e] = A_e^T @ B_e [N, D] over expert e's rows (row j read at idx[j] // fan where gathered), fp32 inside."""
    a_XN, b_XD = a_XN.contiguous(), b_XD.contiguous()
    E, N, D = n_experts or offsets_E1.numel() - 1, a_XN.shape[1], b_XD.shape[1]
    out = torch.empty(E, N, D, dtype=out_dtype or a_XN.dtype, device=a_XN.device)
    interp = triton_interpreting()
    cfg = _gemm_tiles(interp, idx.numel(), N, D)
    if not interp:
        cfg.update(BLOCK_M=32, BLOCK_N=_pow2(N, 16, 64), BLOCK_D=_pow2(D, 16, 64))
    grid = (triton.cdiv(N, cfg["BLOCK_N"]) * triton.cdiv(D, cfg["BLOCK_D"]), E)
    if E and N and D:
        _grouped_wgrad_kernel[grid](a_XN, b_XD, out, offsets_E1, idx, N, D, fan, a_XN.stride(0), b_XD.stride(0),
                                    GATHER_A=gather_a, GATHER_B=gather_b, **_dot_args(a_XN), **cfg)
    return out


def moe_ffn_fwd(x_TH, topk_weights_TK, w_gate_up_E2IH, w_down_EHI, offsets_E1, sorted_idx_M, inv_idx_M):
    """Routed-expert SwiGLU forward -> (out [T, H] in x.dtype, h [M, 2I] gate/up pre-activations for backward)."""
    T, K = topk_weights_TK.shape
    E, H, I = w_down_EHI.shape
    x_TH, w_gate_up_E2IH, w_down_EHI = x_TH.contiguous(), w_gate_up_E2IH.contiguous(), w_down_EHI.contiguous()
    w_M = topk_weights_TK.reshape(-1).contiguous()
    M = sorted_idx_M.numel()
    h_M2I = torch.empty(M, 2 * I, dtype=x_TH.dtype, device=x_TH.device)
    act_MI = torch.empty(M, I, dtype=x_TH.dtype, device=x_TH.device)
    _gemm(SWIGLU_FWD, x_TH, w_gate_up_E2IH, offsets_E1, sorted_idx_M, K, I, H, 1, H, act_MI, h=h_M2I, w=w_M,
          gather=True)
    y_MH = grouped_gemm(act_MI, w_down_EHI, offsets_E1)
    return combine(y_MH, inv_idx_M, K), h_M2I


def moe_ffn_bwd(grad_out_TH, x_TH, topk_weights_TK, w_gate_up_E2IH, w_down_EHI, offsets_E1, sorted_idx_M,
                inv_idx_M, h_M2I):
    """Gradients (d x, d topk_weights, d w_gate_up, d w_down) of moe_ffn_fwd's output, recomputing SwiGLU from h."""
    T, K = topk_weights_TK.shape
    E, H, I = w_down_EHI.shape
    dt = x_TH.dtype
    grad_out_TH, x_TH = grad_out_TH.contiguous().to(dt), x_TH.contiguous()
    w_gate_up_E2IH, w_down_EHI = w_gate_up_E2IH.contiguous(), w_down_EHI.contiguous()
    M = sorted_idx_M.numel()
    grad_h_M2I = torch.empty(M, 2 * I, dtype=dt, device=x_TH.device)
    act_w_MI = torch.empty(M, I, dtype=dt, device=x_TH.device)
    # d(w*act) = dY @ W_down_e, with dY's rows gathered from grad_out; SwiGLU backward in the epilogue
    gw_part = _gemm(SWIGLU_BWD, grad_out_TH, w_down_EHI, offsets_E1, sorted_idx_M, K, I, H, I, 1, grad_h_M2I,
                    h=h_M2I, w=topk_weights_TK.reshape(-1).contiguous(), aux=act_w_MI, gather=True)
    d_w_down = grouped_wgrad(grad_out_TH, act_w_MI, offsets_E1, sorted_idx_M, K, gather_a=True, n_experts=E)
    d_w_gate_up = grouped_wgrad(grad_h_M2I, x_TH, offsets_E1, sorted_idx_M, K, gather_b=True, n_experts=E)
    grad_x_MH = grouped_gemm(grad_h_M2I, w_gate_up_E2IH, offsets_E1, trans_b=False)
    grad_x_TH = combine(grad_x_MH, inv_idx_M, K)
    grad_w_TK = gw_part.sum(1).view(T, K).to(topk_weights_TK.dtype)  # rows are slot-ordered already
    return grad_x_TH, grad_w_TK, d_w_gate_up, d_w_down
