"""FP8 quantisation and block-scaled GEMMs: every backend against kdarch.kernels.fp8_ref.

Quantisation must be bit-exact (bytes and scales) on every backend, against a quantiser written here
from the recipe alone (the e4m3fn grid enumerated from its 256 bit patterns, tiles cut by slicing),
since the "torch" backend *is* fp8_ref's quantiser; GEMMs must match the fp64 dequantised product
(fp8_ref's GEMM references) to fp32-accumulation error; the error against the unquantised fp32 product
is reported and bounded separately. Triton runs under TRITON_INTERPRET=1 without a GPU (see conftest).
"""
import pytest
import torch

from kdarch.checks import set_value_checks
from kdarch.kernels import fp8_ref as ref
from kdarch.kernels.fp8_ref import AMAX_FLOOR, BLOCK, cdiv, e4m3_half_ulp, rel_err
from kdarch.ops import fp8 as F8
from kdarch.ops.backend import resolve
from kdarch.ops.fp8 import triton_backend as F8T

DEV = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ["torch", "triton"]
U32 = 2.0 ** -24


def bits(q):
    return q.view(torch.uint8)


def quant(x, group_rows, backend, **kw):
    fn = F8.quantize_act if group_rows == 1 else F8.quantize_weight
    return fn(x, backend=backend, **kw)


def assert_quant_equal(got, want):
    (q, s), (q_ref, s_ref) = got, want
    assert q.dtype == torch.float8_e4m3fn and q.shape == q_ref.shape and s.shape == s_ref.shape
    assert torch.equal(bits(q).cpu(), bits(q_ref).cpu()), "quantised bytes differ from fp8_ref"
    torch.testing.assert_close(s.cpu(), s_ref.cpu(), rtol=0, atol=0, equal_nan=True)


def assert_accum_close(c, a_q, a_s, b_q, b_s, out_dtype=torch.float32):
    """|c − ref| ≤ (K + 8)·u32·(|A|·|B|ᵀ) (+ bf16 rounding): fp32 accumulation error, nothing more."""
    a, b = ref.dequantize_ref(a_q.cpu(), a_s.cpu()).double(), ref.dequantize_ref(b_q.cpu(), b_s.cpu()).double()
    want = a @ b.T
    tol = (a.shape[1] + 8) * U32 * (a.abs() @ b.abs().T)
    if out_dtype == torch.bfloat16:
        tol = tol + 2.0 ** -8 * want.abs()
    err = (c.cpu().double() - want).abs()
    assert c.dtype == out_dtype and bool((err <= tol + 1e-30).all()), f"max excess {(err - tol).max().item():.3g}"


# ---- the reference's own rounding ---------------------------------------------------------------------------

def test_reference_cast_is_rne_and_saturating():
    """torch's fp32 -> e4m3fn cast (the reference) = nearest grid point, ties to even code, clamp to ±448."""
    grid = torch.arange(127, dtype=torch.uint8).view(torch.float8_e4m3fn).double()  # 0 .. 448
    mids = (grid[1:] + grid[:-1]) / 2
    x = torch.cat([grid, mids, mids * (1 + 1e-6), mids * (1 - 1e-6), torch.rand(4000, dtype=torch.float64) * 470,
                   torch.tensor([1e9, float("inf")], dtype=torch.float64)])
    x = torch.cat([x, -x]).float()
    d = (x.double().abs().clamp(max=448)[:, None] - grid[None]).abs()
    is_best = d == d.min(1, keepdim=True).values
    code = (is_best.double() * 2 - (torch.arange(127) % 2).double() * 0.5).argmax(1)  # even code on ties
    assert torch.equal(x.to(torch.float8_e4m3fn).double(), grid[code] * x.double().sign())


# ---- an independent quantiser ---------------------------------------------------------------------------------

_CODES = torch.arange(256, dtype=torch.uint8)
_VALUES = _CODES.view(torch.float8_e4m3fn).double()  # every e4m3fn bit pattern's value (NaN at 0x7F, 0xFF)
_NONNEG = (_CODES < 0x80) & _VALUES.isfinite()
GRID_CODES, GRID = _CODES[_NONNEG].long(), _VALUES[_NONNEG]  # the 127 finite values >= 0, by bit pattern


def test_e4m3_grid_from_bit_patterns():
    assert len(GRID) == 127 and bool((GRID[1:] > GRID[:-1]).all()) and GRID[-1] == 448.0
    assert GRID[1] == 2.0 ** -9 and _VALUES[0x7F].isnan() and _VALUES[0xFF].isnan()  # smallest subnormal, NaNs
    assert torch.equal(_VALUES[0x80:0xFF], -GRID)  # the sign bit mirrors the grid


def e4m3_bits_by_grid(y: torch.Tensor) -> torch.Tensor:
    """fp32 y -> e4m3fn bit patterns: the nearest grid value, ties to the even bit pattern, |y| > 448 saturating
    to ±448 and NaN to 0x7F; the sign bit from y (so -0.0 and tiny negatives give 0x80)."""
    a = y.double().abs().clamp(max=448.0).nan_to_num(0.0)
    hi = torch.searchsorted(GRID, a).clamp(max=len(GRID) - 1)  # first grid value >= a
    lo = (hi - 1).clamp(min=0)
    d_lo, d_hi = a - GRID[lo], GRID[hi] - a
    take_hi = (d_hi < d_lo) | ((d_hi == d_lo) & (GRID_CODES[hi] % 2 == 0))
    code = torch.where(take_hi, GRID_CODES[hi], GRID_CODES[lo]) | (torch.signbit(y).long() << 7)
    return torch.where(y.isnan(), 0x7F, code).to(torch.uint8)


def _recipe_scale(t: torch.Tensor, dims: tuple[int, ...], amax_floor: float, pow2: bool) -> torch.Tensor:
    """max(amax, floor) / 448 over `dims` in fp32, rounded up to a power of two with pow2; NaN if inf/NaN."""
    amax = t.abs().amax(dim=dims, keepdim=True)
    scale = torch.maximum(amax, torch.tensor(amax_floor, dtype=torch.float32)) / 448.0
    if pow2:
        scale = torch.exp2(torch.ceil(torch.log2(scale.double()))).float()
    return torch.where((~t.isfinite()).any(dim=dims, keepdim=True), float("nan"), scale)


def quantize_by_recipe(x: torch.Tensor, group_rows: int, amax_floor: float = AMAX_FLOOR, pow2: bool = False):
    """(bits uint8 [R, C], scales fp32 [RT, CT]) from the recipe alone, tile by tile: q = e4m3(x / scale)."""
    x = x.detach().float().cpu()
    R, C = x.shape
    q, s = torch.empty(R, C, dtype=torch.uint8), torch.empty(cdiv(R, group_rows), cdiv(C, BLOCK))
    for j, c0 in enumerate(range(0, C, BLOCK)):
        cols = slice(c0, c0 + BLOCK)
        if group_rows == 1:  # 1x128 tiles: one scale per row of this column block
            scale = _recipe_scale(x[:, cols], (1,), amax_floor, pow2)  # [R, 1]
            q[:, cols], s[:, j] = e4m3_bits_by_grid(x[:, cols] / scale), scale[:, 0]
            continue
        for i, r0 in enumerate(range(0, R, group_rows)):  # 128x128 blocks
            rows = slice(r0, r0 + group_rows)
            scale = _recipe_scale(x[rows, cols], (0, 1), amax_floor, pow2)  # [1, 1]
            q[rows, cols], s[i, j] = e4m3_bits_by_grid(x[rows, cols] / scale), scale[0, 0]
    return q, s


def _awkward(shape, seed=0):
    """Random values over six decades, and (with >= 4 rows) an all-zero row, an outlier in the last (partial)
    column tile, a first tile of exact rounding ties (amax 448: scale 1 in 1x128 tiles) and one tile holding
    both a NaN and an inf."""
    torch.manual_seed(seed)
    R, C = shape
    x = torch.randn(shape) * torch.logspace(-3, 3, C)
    if R >= 4:
        x[1] = 0.0
        x[2, C - 1] = 1e4 * x.abs().max()
        ties = torch.cat([GRID[-1:], (GRID[1:] + GRID[:-1]) / 2]).float()[:min(C, BLOCK)]  # 448, then midpoints
        x[3, :len(ties)] = ties * (1 - 2 * (torch.arange(len(ties)) % 3 == 1))  # some negative
        x[R - 1, 0], x[R - 1, min(3, C - 1)] = float("nan"), float("inf")
    return x.to(DEV)


# ---- quantisation --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(1, 128), (5, 1), (7, 200), (130, 97), (256, 384)])
@pytest.mark.parametrize("group_rows", [1, BLOCK])
@pytest.mark.parametrize("pow2", [False, True])
def test_quantize_bit_exact(backend, shape, group_rows, pow2):
    x = _awkward(shape)
    q, s = quant(x, group_rows, backend, pow2_scale=pow2)
    q_want, s_want = quantize_by_recipe(x, group_rows, pow2=pow2)
    RT = shape[0] if group_rows == 1 else cdiv(shape[0], BLOCK)
    assert q.dtype == torch.float8_e4m3fn and q.shape == x.shape and tuple(s.shape) == (RT, cdiv(shape[1], BLOCK))
    torch.testing.assert_close(s.cpu(), s_want, rtol=0, atol=0, equal_nan=True)
    mismatch = (bits(q).cpu() != q_want).nonzero()
    assert mismatch.numel() == 0, f"{len(mismatch)} bytes differ from the recipe, first at {mismatch[0].tolist()}"
    if shape[0] >= 4 and group_rows == 1:  # the special rows are what they should be
        assert not bits(q)[1].any() and s[-1, 0].isnan() and bool(s[:-1].isfinite().all())


@pytest.mark.parametrize("backend", BACKENDS)
def test_quantize_expert_weights_per_expert(backend):
    """[E, N, K] weights: 128×128 blocks never straddle two experts (N = 130 is not a multiple of 128)."""
    w = torch.randn(3, 130, 200, device=DEV) * torch.tensor([1e-2, 1.0, 1e2], device=DEV)[:, None, None]
    q, s = F8.quantize_weight(w, backend=backend)
    assert q.shape == w.shape and s.shape == (3, 2, 2)
    for e in range(3):
        assert_quant_equal((q[e], s[e]), ref.quantize_weight_ref(w[e].cpu()))


@pytest.mark.parametrize("backend", BACKENDS)
def test_rounding_grid_points_and_ties(backend):
    """Scale exactly 1 (every row's amax is 448): each value meets the e4m3 rounding directly."""
    grid = torch.arange(127, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    mids = (grid[1:] + grid[:-1]) / 2
    vals = torch.cat([grid, mids, mids.nextafter(mids + 1), mids.nextafter(mids - 1), torch.tensor([447.9, 448.0])])
    vals = torch.cat([vals, -vals])
    n = ref.cdiv(vals.numel(), 127) * 127
    x = torch.cat([torch.full((n // 127, 1), 448.0), torch.cat([vals, vals.new_zeros(n - vals.numel())]).view(-1, 127)],
                  dim=1).to(DEV)
    q, s = F8.quantize_act(x, backend=backend)
    assert torch.equal(s.cpu(), torch.ones(x.shape[0], 1))
    assert torch.equal(bits(q).cpu(), bits(x.cpu().to(torch.float8_e4m3fn)))
    ties = torch.tensor([[448.0, 1.0625, 1.1875, -3.375, 0.0029296875, 416.0 + 16]], device=DEV)  # -> even codes
    assert F8.quantize_act(ties, backend=backend)[0].float().cpu().tolist() == [[448.0, 1.0, 1.25, -3.5, 0.00390625,
                                                                                 448.0]]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("group_rows", [1, BLOCK])
@pytest.mark.parametrize("case", ["normal", "outlier", "tiny", "huge"])
def test_round_trip_within_half_ulp(backend, group_rows, case):
    torch.manual_seed(1)
    x = torch.randn(160, 300, device=DEV)
    if case == "outlier":
        x[3, 7] = 300.0
    x = x * {"normal": 1.0, "outlier": 1.0, "tiny": 1e-7, "huge": 1e36}[case]
    q, s = quant(x, group_rows, backend)
    se = ref.expand_scales(s.cpu().double(), group_rows, *x.shape)
    err = (ref.dequantize_ref(q.cpu(), s.cpu()).double() - x.cpu().double()).abs()
    bound = se * e4m3_half_ulp(x.cpu().double() / se) + 2.0 ** -22 * x.cpu().double().abs()
    assert bool((err <= bound).all())
    if case == "tiny":  # below the amax floor: the floor sets the scale (a coarser grid, same bound)
        assert bool((s == torch.tensor(ref.AMAX_FLOOR) / 448.0).all())
    if case == "outlier":
        assert abs(ref.dequantize_ref(q.cpu(), s.cpu())[3, 7].item() - 300.0) < 300.0 * 2 ** -22
    if case != "tiny":  # each tile's amax lands exactly on 448
        assert bool((ref._tiles(q.cpu().float().abs(), group_rows).amax(dim=(1, 3)) == 448.0).all())


@pytest.mark.parametrize("backend", BACKENDS)
def test_scale_values_and_pow2(backend):
    x = torch.randn(5, 300, device=DEV)
    q, s = F8.quantize_act(x, backend=backend)
    for r in range(5):
        for t in range(3):
            amax = x[r, t * 128:(t + 1) * 128].abs().max()
            assert s[r, t] == torch.maximum(amax, amax.new_tensor(1e-4)) / 448.0
    _, s2 = F8.quantize_act(x, pow2_scale=True, backend=backend)
    assert bool((torch.frexp(s2)[0] == 0.5).all()) and bool((s2 >= s).all()) and bool((s2 < 2 * s).all())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("group_rows", [1, BLOCK])
def test_zeros(backend, group_rows):
    x = torch.zeros(130, 200, device=DEV)
    q, s = quant(x, group_rows, backend)
    assert not bits(q).any() and bool((s == torch.tensor(1e-4) / 448.0).all())
    assert not F8.dequantize(q, s, backend=backend).any()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("group_rows", [1, BLOCK])
def test_nonfinite_poisons_its_tile_only(backend, group_rows):
    torch.manual_seed(2)
    x = torch.randn(260, 300, device=DEV)
    bad = [(0, 5, float("inf")), (3, 130, float("nan")), (200, 290, float("-inf"))]
    for r, c, v in bad:
        x[r, c] = v
    q, s = quant(x, group_rows, backend)
    assert_quant_equal((q, s), ref.quantize_ref(x.cpu(), group_rows))
    bad_T = torch.zeros(s.shape, dtype=torch.bool)
    for r, c, _ in bad:
        bad_T[r // group_rows, c // BLOCK] = True
    bad_RC = ref.expand_scales(bad_T, group_rows, *x.shape)
    q_clean, s_clean = quant(x.nan_to_num(0.0, 0.0, 0.0), group_rows, backend)
    qb, sb = bits(q).cpu(), s.cpu()
    assert torch.equal(sb.isnan(), bad_T) and torch.equal(sb[~bad_T], s_clean.cpu()[~bad_T])
    assert bool((qb[bad_RC] == ref.E4M3_NAN_BYTE).all()) and torch.equal(qb[~bad_RC], bits(q_clean).cpu()[~bad_RC])
    assert torch.equal(F8.dequantize(q, s, backend=backend).cpu().isnan(), bad_RC)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dequantize_bit_exact(backend):
    torch.manual_seed(3)
    x = torch.randn(130, 200, device=DEV)
    x[1, 1] = float("nan")
    for group_rows in (1, BLOCK):
        q, s = quant(x, group_rows, "torch")
        d = F8.dequantize(q, s, backend=backend).cpu()
        torch.testing.assert_close(d, ref.dequantize_ref(q.cpu(), s.cpu()), rtol=0, atol=0, equal_nan=True)


# ---- GEMMs ---------------------------------------------------------------------------------------------------

def _operands(M, N, K, seed=0):
    torch.manual_seed(seed)
    x, w = torch.randn(M, K, device=DEV), torch.randn(N, K, device=DEV)
    return x, w, F8.quantize_act(x, backend="torch"), F8.quantize_weight(w, backend="torch")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("M, N, K", [(1, 128, 128), (7, 96, 200), (130, 256, 384), (64, 200, 97)])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_gemm_matches_dequantised_reference(backend, M, N, K, out_dtype):
    _, _, (xq, xs), (wq, ws) = _operands(M, N, K)
    c = F8.fp8_gemm(xq, xs, wq, ws, out_dtype, backend=backend)
    assert c.shape == (M, N)
    assert_accum_close(c, xq, xs, wq, ws, out_dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gemm_bf16_epilogue_is_exact_rounding(backend):
    _, _, (xq, xs), (wq, ws) = _operands(130, 256, 384)
    c32 = F8.fp8_gemm(xq, xs, wq, ws, torch.float32, backend=backend)
    assert torch.equal(F8.fp8_gemm(xq, xs, wq, ws, torch.bfloat16, backend=backend), c32.to(torch.bfloat16))


@pytest.mark.parametrize("backend", BACKENDS)
def test_gemm_error_vs_unquantised_fp32(backend):
    x, w, (xq, xs), (wq, ws) = _operands(128, 256, 512)
    err = rel_err(F8.fp8_gemm(xq, xs, wq, ws, torch.float32, backend=backend).cpu(), (x @ w.T).cpu())
    print(f"fp8 GEMM vs fp32 ({backend}): relative Frobenius error {err:.4f}")
    assert 0.01 < err < 0.06  # ≈ 0.037 for random normal data with 1×128 / 128×128 scales


@pytest.mark.parametrize("backend", BACKENDS)
def test_gemm_backward_operand_forms(backend):
    """dX form: B = Wᵀ as a strided view with transposed block scales; dW form: B with 1×128 row scales."""
    torch.manual_seed(4)
    dy, w, x = torch.randn(64, 256, device=DEV), torch.randn(256, 200, device=DEV), torch.randn(64, 200, device=DEV)
    gq, gs = F8.quantize_act(dy, backend="torch")
    wq, ws = F8.quantize_weight(w, backend="torch")
    assert_accum_close(F8.fp8_gemm(gq, gs, wq.t(), ws.t(), torch.float32, backend=backend), gq, gs, wq.t(), ws.t())
    aq, as_ = F8.quantize_act(dy.t(), backend="torch")
    bq, bs = F8.quantize_act(x.t(), backend="torch")
    assert_accum_close(F8.fp8_gemm(aq, as_, bq, bs, torch.float32, backend=backend), aq, as_, bq, bs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gemm_nan_tile_poisons_output(backend):
    x, w, _, _ = _operands(16, 256, 256)
    x[0, 3] = float("nan")
    w[200, 130] = float("inf")
    c = F8.fp8_gemm(*F8.quantize_act(x, backend=backend), *F8.quantize_weight(w, backend=backend), torch.float32,
                    backend=backend).cpu()
    assert c[0].isnan().all() and c[1:, 128:].isnan().all() and c[1:, :128].isfinite().all()


def _grouped_operands(counts, N, K, seed=5):
    torch.manual_seed(seed)
    offs = torch.tensor([0] + counts, device=DEV).cumsum(0)
    x, w = torch.randn(int(offs[-1]), K, device=DEV), torch.randn(len(counts), N, K, device=DEV)
    return offs, x, w, F8.quantize_act(x, backend="torch"), F8.quantize_weight(w, backend="torch")


def _abs_q(q):
    """|q| as e4m3fn (exact: the grid is symmetric): the operands of the accumulation error bound."""
    return q.float().abs().to(torch.float8_e4m3fn)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("counts", [[0, 1, 130, 5, 0, 64, 33], [0, 0, 70], [9, 0]])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_grouped_gemm_matches_grouped_reference(backend, counts, out_dtype):
    """Ragged segments (empty ones first, inside and last) against fp8_ref.fp8_grouped_gemm_ref (fp64)."""
    N, K = 96, 200
    offs, x, w, (xq, xs), (wq, ws) = _grouped_operands(counts, N, K)
    assert wq.shape == w.shape and ws.shape == (len(counts), 1, 2)
    c = F8.fp8_grouped_gemm(xq, xs, wq, ws, offs, out_dtype, backend=backend)
    cpu = [t.cpu() for t in (xq, xs, wq, ws, offs)]
    want = ref.fp8_grouped_gemm_ref(*cpu, torch.float64)
    tol = (K + 8) * U32 * ref.fp8_grouped_gemm_ref(_abs_q(cpu[0]), cpu[1], _abs_q(cpu[2]), cpu[3], cpu[4],
                                                   torch.float64)
    if out_dtype == torch.bfloat16:
        tol = tol + 2.0 ** -8 * want.abs()
    err = (c.cpu().double() - want).abs()
    assert c.shape == (x.shape[0], N) and c.dtype == out_dtype
    assert bool((err <= tol + 1e-30).all()), f"max excess {(err - tol).max().item():.3g}"
    o = offs.tolist()
    err32 = rel_err(c.cpu().float(), torch.cat([x[o[e]:o[e + 1]] @ w[e].T for e in range(len(counts))]).cpu())
    assert err32 < 0.06


def test_grouped_offsets_order_is_a_value_check():
    """offs.tolist() is a host sync: only where kdarch.checks.value_checks_on says so; the shape always."""
    offs, _, _, (xq, xs), (wq, ws) = _grouped_operands([1, 3], 96, 200)
    bad = torch.tensor([0, 3, 1])  # decreasing, and not ending at the row count 4
    try:
        set_value_checks(False)
        F8.fp8_grouped_gemm(xq, xs, wq, ws, bad, backend="torch")  # not read: no error
        with pytest.raises(ValueError, match=r"offsets: expected an int64/int32 tensor \[E\+1=3\]"):
            F8.fp8_grouped_gemm(xq, xs, wq, ws, bad[:2], backend="torch")
        set_value_checks(True)
        with pytest.raises(ValueError, match=r"never decrease and end at the row count 4, got \[0, 3, 1\]$"):
            F8.fp8_grouped_gemm(xq, xs, wq, ws, bad, backend="torch")
    finally:
        set_value_checks(None)


@pytest.mark.parametrize("backend", BACKENDS)
def test_kgrouped_gemm_reduces_each_segment(backend):
    offs, x, _, _, _ = _grouped_operands([0, 1, 130, 5, 0, 64, 33], 96, 200)
    dy = torch.randn(x.shape[0], 96, device=DEV)
    aq, as_ = F8.quantize_act(dy.t(), backend="torch")
    bq, bs = F8.quantize_act(x.t(), backend="torch")
    c = resolve("fp8_kgrouped_gemm", backend)(aq, as_, bq, bs, offs, torch.float32).cpu()
    want = ref.fp8_kgrouped_gemm_ref(aq.cpu(), as_.cpu(), bq.cpu(), bs.cpu(), offs.cpu(), torch.float64)
    tol = 300 * U32 * ref.fp8_kgrouped_gemm_ref(aq.cpu().float().abs().to(torch.float8_e4m3fn), as_.cpu(),
                                                bq.cpu().float().abs().to(torch.float8_e4m3fn), bs.cpu(), offs.cpu(),
                                                torch.float64)
    assert c.shape == (7, 96, 200) and bool(((c.double() - want).abs() <= tol).all())
    assert not c[0].any() and not c[4].any()  # experts without tokens get a zero gradient


# ---- bad input -----------------------------------------------------------------------------------------------

def _bad_calls():
    xq, xs = F8.quantize_act(torch.randn(4, 256), backend="torch")
    wq, ws = F8.quantize_weight(torch.randn(130, 256), backend="torch")
    gq, gs = F8.quantize_weight(torch.randn(2, 130, 256), backend="torch")
    offs = torch.tensor([0, 1, 4])
    return [
        (lambda: F8.quantize_act(torch.arange(4)),
         r"^quantize_act: x: expected a float tensor \[\.\.\., K\] \(fp32, bf16 or fp16\), got an int64 tensor"),
        (lambda: F8.quantize_act(xq), r"^quantize_act: x: expected a float tensor .*, got a float8_e4m3fn tensor"),
        (lambda: F8.quantize_weight(torch.randn(128)),
         r"^quantize_weight: w: expected a float tensor \[N, K\] or \[E, N, K\] .*, got .* of shape \(128,\)$"),
        (lambda: F8.fp8_gemm(xq.float(), xs, wq, ws),
         r"^fp8_gemm: x_q: expected a 2-D float8_e4m3fn tensor, got a float32 tensor of shape \(4, 256\)$"),
        (lambda: F8.fp8_gemm(xq, xs[:, :1], wq, ws),
         r"^fp8_gemm: x_s: expected a float32 tensor \[rows, ceil\(256/128\)=2\], got .* \(4, 1\)$"),
        (lambda: F8.fp8_gemm(xq, xs[:3], wq, ws),
         r"^fp8_gemm: x_s: expected 4 rows \(1×128 tiles of x_q \[4, 256\]\), got .* \(3, 2\)$"),
        (lambda: F8.fp8_gemm(xq, xs, wq, ws[:1]),
         r"^fp8_gemm: w_s: expected 130 rows \(1×128 tiles of w_q \[130, 256\]\) or 2 rows \(128×128 blocks\)"),
        (lambda: F8.fp8_gemm(xq, xs, wq[:, :128], ws[:, :1]),
         r"^fp8_gemm: w_q: expected a tensor \[N, K=256\] \(K as in x_q\), got .* \(130, 128\)$"),
        (lambda: F8.fp8_gemm(xq, xs, wq, ws, torch.float16),
         r"^fp8_gemm: out_dtype: expected torch.bfloat16 or torch.float32, got torch.float16$"),
        (lambda: F8.fp8_grouped_gemm(xq, xs, gq, gs, torch.tensor([0, 1, 3])),
         r"^fp8_grouped_gemm: offsets: expected offsets that start at 0, never decrease and end at the row count 4, "
         r"got \[0, 1, 3\]$"),
        (lambda: F8.fp8_grouped_gemm(xq, xs, gq, gs, torch.tensor([0, 3, 1, 4])),
         r"^fp8_grouped_gemm: offsets: expected an int64/int32 tensor \[E\+1=3\] \(segment starts, then the end\)"),
        (lambda: F8.fp8_grouped_gemm(xq, xs, gq, gs[:, :1], offs),
         r"^fp8_grouped_gemm: w_s: expected a float32 tensor \[E=2, ceil\(130/128\)=2, ceil\(256/128\)=2\], "
         r"got .* \(2, 1, 2\)$"),
        (lambda: F8.fp8_linear(torch.randn(3, 5), torch.randn(4, 6)),
         r"^fp8_linear: x: expected a last dimension of the weight's in_features K=6, got .* \(3, 5\)$"),
        (lambda: F8.fp8_grouped_linear(torch.randn(4, 256), torch.randn(8, 256), offs),
         r"^fp8_grouped_linear: weight: expected a float tensor \[E, N, K\]"),
        (lambda: F8.fp8_grouped_linear(torch.randn(4, 256), torch.randn(2, 8, 256), torch.tensor([0, 3, 1])),
         r"^fp8_grouped_linear: offsets: expected offsets that start at 0, never decrease"),
        (lambda: F8.dequantize(xq, xs[:, :1]),
         r"^dequantize: s: expected a float32 tensor \[rows, ceil\(256/128\)=2\]"),
        (lambda: F8.fp8_gemm(xq, xs, wq, ws, backend="cuda"),
         r"^fp8_gemm: backend: expected one of 'torch', 'triton', 'cpp', 'auto' \(available for this op here: .*, "
         r"got 'cuda'$"),
    ]


@pytest.mark.parametrize("i", range(len(_bad_calls())))
def test_bad_input_is_rejected_with_a_clear_error(i):
    fn, match = _bad_calls()[i]
    with pytest.raises(ValueError, match=match):
        fn()


def test_non_tensor_input_raises_type_error():
    with pytest.raises(TypeError, match=r"^quantize_act: x: expected a torch.Tensor, got \[1.0\]$"):
        F8.quantize_act([1.0])
    with pytest.raises(TypeError, match=r"^fp8_linear: weight: expected a torch.Tensor, got None$"):
        F8.fp8_linear(torch.randn(3, 5), None)


def test_custom_ops_pass_opcheck():
    xq, xs = F8.quantize_act(torch.randn(7, 200), backend="torch")
    wq, ws = F8.quantize_weight(torch.randn(96, 200), backend="torch")
    gq, gs = F8.quantize_weight(torch.randn(2, 96, 200), backend="torch")
    offs = torch.tensor([0, 3, 7])
    dyt = F8.quantize_act(torch.randn(96, 7), backend="torch")  # dY^T and X^T of the K-grouped wgrad
    xt = F8.quantize_act(torch.randn(200, 7), backend="torch")
    torch.library.opcheck(F8T.quantize_op, (torch.randn(7, 200), 1, 1e-4, False))
    # test_schema compares fp8 inputs with ops torch lacks for Float8_e4m3fn on the CPU: fakes only
    for op, args in [(F8T.dequantize_op, (wq, ws, BLOCK, torch.float32)),
                     (F8T.gemm_op, (xq, xs, wq, ws, BLOCK, torch.bfloat16)),
                     (F8T.grouped_gemm_op, (xq, xs, gq, gs, offs, torch.float32)),
                     (F8T.kgrouped_gemm_op, (*dyt, *xt, offs, torch.float32))]:
        torch.library.opcheck(op, args, test_utils=("test_faketensor", "test_autograd_registration"))


# ---- GPU lowering, without a GPU -----------------------------------------------------------------------------

AOT_SCRIPT = r'''
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from kdarch.kernels import fp8 as k

def build(fn, num_warps=4, **args):
    """args: name -> '*type' / 'i32' / 'fp32' (a trailing '!' = divisible by 16) or a constexpr value."""
    sig, consts, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        v = args[name]
        if isinstance(v, str) and (v[0] == "*" or v.rstrip("!") in ("i32", "i64", "fp32")):
            sig[name] = v.rstrip("!")
            if v.endswith("!") or v.startswith("*"):
                attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            sig[name], consts[name] = "constexpr", v
    return triton.compile(ASTSource(fn, sig, consts, attrs), target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=num_warps, num_stages=3)).asm["ptx"]

for x_ty, g in (("*bf16", 1), ("*fp32", 128)):
    ptx = build(k._quant_kernel, x_ptr=x_ty, q_ptr="*u8", s_ptr="*fp32", R="i32", C="i32!", s_xe="i64!",
                s_xr="i32!", s_xc=1, s_qe="i64!", s_qr="i32!", s_se="i32", s_sr="i32", amax_floor="fp32", GROUP_R=g,
                BLOCK_R=32 if g == 1 else 128, BLOCK_C=128, POW2=g > 1)
    assert "div.rn.f32" in ptx and "div.full" not in ptx and "div.approx" not in ptx
build(k._dequant_kernel, q_ptr="*u8", s_ptr="*fp32", y_ptr="*fp32", R="i32", C="i32!", s_qr="i32!", s_qc=1,
      s_sr="i32", s_yr="i32!", GROUP_R=128, BLOCK_R=128, BLOCK_C=128)
for mode, b_group, bf16, trans_b in ((0, 128, True, False), (0, 128, True, True), (0, 1, False, False),
                                     (1, 128, True, False), (1, 128, False, True), (2, 1, False, False)):
    ptx = build(k._fp8_gemm_kernel, num_warps=8, a_ptr="*fp8e4nv", b_ptr="*fp8e4nv",
                c_ptr="*bf16" if bf16 else "*fp32", as_ptr="*fp32", bs_ptr="*fp32", offs_ptr="*i64", tile_g_ptr="*i32",
                tile_m_ptr="*i64", M="i32", N="i32", K="i32!", s_am="i32!", s_ak=1, s_bg="i64!",
                s_bn=1 if trans_b else "i32!", s_bk="i32!" if trans_b else 1, s_cg="i64!", s_cm="i32!", s_cn=1,
                s_asm="i32", s_ask=1, s_bsg="i32", s_bsn="i32", s_bsk="i32", MODE=mode, B_GROUP=b_group,
                OUT_BF16=bf16, BLOCK_M=128, BLOCK_N=128, BLOCK_K=128)
    assert "wgmma" in ptx and "e4m3" in ptx, (mode, b_group, trans_b)
print("ok")
'''


def test_kernels_compile_for_sm90_without_a_gpu(tmp_path):
    """The interpreter skips the compiler (types, dot layouts, division flavour): lower every variant for Hopper."""
    pytest.importorskip("triton.backends.nvidia.compiler")
    import os
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path), TRITON_DEFAULT_FP_FUSION="1")
    res = subprocess.run([sys.executable, "-c", AOT_SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    if "ptxas" in res.stderr and "not found" in res.stderr:
        pytest.skip("no ptxas in this triton install")
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-3000:]
