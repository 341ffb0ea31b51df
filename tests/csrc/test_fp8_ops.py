"""The compiled FP8 quantiser and dequantiser: bit-identical to kdarch.kernels.fp8_ref (the torch backend).

Bytes and scales must be equal, NaN for NaN, on awkward shapes (1 row, K not a multiple of 128, 97 columns,
3-D expert stacks), in every input dtype, with and without power-of-two scales and with the floors in use
(0 included); the e4m3 rounding itself is checked on every grid point, every midpoint and its neighbours,
and a sweep of fp32 bit patterns, against torch's own cast. Dequantisation must equal q.float() * scale.
"""
import pytest
import torch

from kdarch.kernels import fp8_ref as ref
from kdarch.kernels.fp8_ref import AMAX_FLOOR, BLOCK, GRAD_AMAX_FLOOR
from kdarch.ops import fp8 as F8
from kdarch.ops.fp8.torch_backend import dequantize_torch

SHAPES = [(1, 1), (1, 128), (5, 1), (7, 200), (130, 97), (129, 257)]


def bits(q):
    return q.view(torch.uint8)


def awkward(shape, seed=0):
    """Scales over 6 decades, an all-zero row, an outlier, exact e4m3 ties, and a NaN and an inf in one tile."""
    g = torch.Generator().manual_seed(seed)
    R, C = shape
    x = torch.randn(shape, generator=g) * torch.logspace(-3, 3, C)
    if R >= 4:
        x[1] = 0.0
        x[2, C - 1] = 1e4 * x.abs().max()
        grid = torch.arange(127, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
        ties = torch.cat([grid[-1:], (grid[1:] + grid[:-1]) / 2])[:C]
        x[3, :len(ties)] = ties * (1 - 2 * (torch.arange(len(ties)) % 3 == 1))
        x[R - 1, 0], x[R - 1, min(3, C - 1)] = float("nan"), float("inf")
    return x


def assert_same(got, want):
    (q, s), (q_ref, s_ref) = got, want
    assert q.dtype == torch.float8_e4m3fn and q.shape == q_ref.shape and s.shape == s_ref.shape
    diff = (bits(q) != bits(q_ref)).nonzero()
    assert diff.numel() == 0, f"{len(diff)} bytes differ from fp8_ref, first at {diff[0].tolist()}"
    torch.testing.assert_close(s, s_ref, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("group_rows", [1, BLOCK])
@pytest.mark.parametrize("pow2", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_quantize_bit_identical(lib, shape, group_rows, pow2, dtype):
    x = awkward(shape).to(dtype)
    for floor in (AMAX_FLOOR, GRAD_AMAX_FLOOR, 0.0):
        assert_same(lib.fp8_quantize(x, group_rows, floor, pow2), ref.quantize_ref(x, group_rows, floor, pow2))
    if shape[0] >= 4 and group_rows == 1 and dtype != torch.float16:  # the special rows (fp16 overflows the outlier)
        q, s = lib.fp8_quantize(x, 1, AMAX_FLOOR, pow2)
        assert not bits(q)[1].any() and s[-1, 0].isnan() and bool(s[:-1].isfinite().all())
        assert bool((bits(q)[-1, :min(BLOCK, shape[1])] == ref.E4M3_NAN_BYTE).all())  # only the NaN tile


def test_quantize_3d_expert_stack_and_strided_input(lib):
    w = torch.randn(3, 130, 200) * torch.tensor([1e-2, 1.0, 1e2])[:, None, None]
    q, s = lib.fp8_quantize(w, BLOCK, AMAX_FLOOR, False)
    assert q.shape == w.shape and s.shape == (3, 2, 2)
    for e in range(3):
        assert_same((q[e], s[e]), ref.quantize_ref(w[e], BLOCK, AMAX_FLOOR, False))
    x = awkward((300, 200))
    assert_same(lib.fp8_quantize(x.t(), 1, GRAD_AMAX_FLOOR, False), ref.quantize_ref(x.t(), 1, GRAD_AMAX_FLOOR))


def test_rounding_matches_torch_cast_everywhere(lib):
    """Scale exactly 1 (each row starts with 448): every value meets the e4m3 rounding directly."""
    grid = torch.arange(127, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    mids = (grid[1:] + grid[:-1]) / 2
    sweep = torch.arange(0, 0x43E00001, 4099, dtype=torch.int64).to(torch.int32).view(torch.float32)  # 0 .. 448
    vals = torch.cat([grid, mids, mids.nextafter(mids + 1), mids.nextafter(mids - 1), sweep])
    vals = torch.cat([vals, -vals])
    n = -(-vals.numel() // 127) * 127
    x = torch.cat([torch.full((n // 127, 1), 448.0), torch.cat([vals, vals.new_zeros(n - vals.numel())]).view(-1, 127)],
                  dim=1)
    q, s = lib.fp8_quantize(x, 1, AMAX_FLOOR, False)
    assert torch.equal(s, torch.ones(x.shape[0], 1))
    assert torch.equal(bits(q), bits(x.to(torch.float8_e4m3fn)))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("group_rows", [1, BLOCK])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_dequantize_equals_reference(lib, shape, group_rows, out_dtype):
    q, s = ref.quantize_ref(awkward(shape), group_rows)
    want = ref.dequantize_ref(q, s, group_rows).to(out_dtype)
    got = lib.fp8_dequantize(q, s, group_rows, out_dtype)
    assert got.dtype == out_dtype
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
    if group_rows == BLOCK:  # a transposed weight (the dX GEMM): same values, and a transposed layout like torch's
        got_t = lib.fp8_dequantize(q.t(), s.t(), BLOCK, out_dtype)
        torch.testing.assert_close(got_t, want.t(), rtol=0, atol=0, equal_nan=True)
        if min(shape) > 1:  # the layout torch's dequantiser gives (the next matmul's kernel depends on it)
            assert got_t.stride() == dequantize_torch(q.t(), s.t(), BLOCK).stride() == (1, shape[1])


def test_same_bits_at_one_and_two_threads(lib, threads):
    x = awkward((257, 1000))
    a = threads(1, lib.fp8_quantize, x, 1, AMAX_FLOOR, False)
    b = threads(2, lib.fp8_quantize, x, 1, AMAX_FLOOR, False)
    assert torch.equal(bits(a[0]), bits(b[0])) and torch.equal(a[1].nan_to_num(), b[1].nan_to_num())


def test_functional_api_on_cpp_backend(lib):
    """kdarch.ops.fp8 with backend="cpp": the same results as "torch", the GEMMs included (same dequantised
    operands and layouts, so the same matmul)."""
    x, w = torch.randn(37, 300), torch.randn(3, 130, 300)
    for fn, args in [(F8.quantize_act, (x,)), (F8.quantize_weight, (w[0],)), (F8.quantize_weight, (w,))]:
        assert_same(fn(*args, backend="cpp"), fn(*args, backend="torch"))
    xq, wq = F8.quantize_act(x), F8.quantize_weight(w[0])
    for b in (False, True):
        args = (*xq, *wq) if not b else (*xq, wq[0].t().contiguous(), F8.quantize_act(w[0].t().contiguous())[1])
        if b:
            args = (*xq, *F8.quantize_act(torch.randn(64, 300)))
        assert torch.equal(F8.fp8_gemm(*args, backend="cpp"), F8.fp8_gemm(*args, backend="torch"))
    offs = torch.tensor([0, 10, 10, 37])
    wq3 = F8.quantize_weight(w)
    assert torch.equal(F8.fp8_grouped_gemm(*xq, *wq3, offs, backend="cpp"),
                       F8.fp8_grouped_gemm(*xq, *wq3, offs, backend="torch"))
    torch.testing.assert_close(F8.dequantize(*wq, backend="cpp"), F8.dequantize(*wq, backend="torch"), rtol=0, atol=0)


def test_bad_input_is_refused(lib):
    with pytest.raises(RuntimeError, match=r"fp8_quantize: x: expected a 2-D \[R, C\] or 3-D \[E, R, C\] "
                                           r"fp32/bf16/fp16 tensor, got Long tensor of shape \[2, 3\]"):
        lib.fp8_quantize(torch.zeros(2, 3, dtype=torch.long), 1, AMAX_FLOOR, False)
    q, s = ref.quantize_ref(torch.randn(4, 200), 1)
    with pytest.raises(RuntimeError, match=r"fp8_dequantize: s: expected a float32 tensor \[1, 2\], got Float "
                                           r"tensor of shape \[4, 2\]"):
        lib.fp8_dequantize(q, s, BLOCK, torch.float32)


def test_fp8_ops_pass_opcheck(lib):
    x = awkward((130, 200)).nan_to_num(posinf=1.0)  # opcheck compares outputs without equal_nan
    q, s = ref.quantize_ref(x, BLOCK)
    for args in [(x, 1, AMAX_FLOOR, False), (x.bfloat16(), 128, 0.0, True), (torch.randn(2, 5, 130), 128, 1e-4, False)]:
        torch.library.opcheck(lib.fp8_quantize, args)
    # test_schema compares fp8 inputs with ops torch lacks for Float8_e4m3fn on the CPU: the other checks only
    for args in [(q, s, BLOCK, torch.bfloat16), (q.t(), s.t(), BLOCK, torch.float32)]:
        torch.library.opcheck(lib.fp8_dequantize, args, test_utils=("test_faketensor", "test_autograd_registration",
                                                                    "test_aot_dispatch_dynamic"))
