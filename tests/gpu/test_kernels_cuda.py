"""Every kernel on the device against its reference, forward and backward, at GPU sizes.

The CPU suite runs these kernels under the Triton interpreter, which cannot execute some paths (a bf16
`tl.dot`: it computes in fp32 there) and never runs the compiler's layouts at scale; here they run for real.
Bounds: fp32 results against the fp32 / fp64 references; bf16 within twice PyTorch's own bf16 error;
FP8 quantisation bit for bit; FP8 GEMMs against the dequantised operands in fp64, allowing for Hopper's FP8
tensor cores, which accumulate with about 14 mantissa bits inside each 128-wide K block (DeepSeek-V3 §3.3)
before kdarch promotes the partial sums to fp32.

Legend: T tokens, K top-k, E experts, H hidden, I expert intermediate, M = T*K rows.
"""
import pytest
import torch

from kdarch import ops
from kdarch.kernels import fp8_ref as ref
from kdarch.kernels import testing as kt
from kdarch.kernels.fp8_ref import rel_err
from kdarch.kernels.moe_ref import moe_ffn_ref, routing_metadata_ref
from kdarch.ops import fp8 as F8
from kdarch.ops.backend import resolve
from kdarch.ops.moe import routing_metadata

FP8_BLOCK_ACCUM = 2.0 ** -13  # per-element bound inside a 128-K block, relative to sum |a|·|b|: 14-bit accumulation


def _moe_inputs(shape, routing, dtype, dev, seed=0):
    T, H, I, E, K = shape
    return [t.to(dev) for t in kt.make_inputs(T, H, I, E, K, routing, dtype=dtype, seed=seed)]


# ---- MoE dispatch ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", kt.MOE_CASES, ids=kt.MOE_CASE_IDS)
def test_moe_awkward_cases_on_the_device(case, dev):
    _, T, H, I, E, K, routing = case
    inp = _moe_inputs((T, H, I, E, K), routing, torch.float32, dev)
    for name, got, want in zip(kt.MOE_GRAD_NAMES, kt.fwd_bwd(lambda *a: ops.moe_ffn(*a, backend="triton"), *inp),
                               kt.fwd_bwd(moe_ffn_ref, *inp)):
        assert kt.max_rel_err(got, want) < 1e-4, f"{name}: {kt.max_rel_err(got, want):.2e}"


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_moe_ffn_at_scale(backend, dtype, dev, sizes):
    """fp32: the reference's numbers; bf16 (the real `tl.dot` bf16 path): within 2x PyTorch's bf16 error."""
    inp = _moe_inputs(sizes["moe"], "random", dtype, dev, seed=1)
    want = kt.fwd_bwd(moe_ffn_ref, inp[0].float(), inp[1], inp[2], inp[3].float(), inp[4].float())
    got = kt.fwd_bwd(lambda *a: ops.moe_ffn(*a, backend=backend), *inp)
    base = kt.fwd_bwd(kt.moe_ffn_lowp, *inp) if dtype != torch.float32 else None
    for i, name in enumerate(kt.MOE_GRAD_NAMES):
        err = kt.max_rel_err(got[i], want[i])
        bar = 1e-4 if base is None else 2 * kt.max_rel_err(base[i], want[i]) + 5e-4
        assert err <= bar, f"{name}: err {err:.2e} > {bar:.2e}"


def test_moe_routing_metadata_on_the_device(dev, sizes):
    T, _, _, E, K = sizes["moe"]
    ids = torch.rand(T, E, generator=torch.Generator().manual_seed(2)).topk(K, dim=-1).indices
    ids[: T // 2] = ids[: T // 2] % (E // 2)  # a skewed load, some experts crowded
    for got, want in zip(routing_metadata(ids.to(dev), E), routing_metadata_ref(ids, E)):
        assert torch.equal(got.cpu(), want)


def test_moe_triton_is_deterministic(dev, sizes):
    inp = _moe_inputs(sizes["moe"], "random", torch.bfloat16, dev, seed=3)
    fn = lambda *a: ops.moe_ffn(*a, backend="triton")  # noqa: E731
    assert all(torch.equal(a, b) for a, b in zip(kt.fwd_bwd(fn, *inp), kt.fwd_bwd(fn, *inp)))


# ---- FP8 quantisation ------------------------------------------------------------------------------------------

def _awkward_matrix(R, C, dev, seed=0):
    """Normal values with an outlier, an all-zero row, a tiny-amax tile and a NaN tile."""
    x = torch.randn(R, C, generator=torch.Generator().manual_seed(seed))
    x[1, 5] = 3.0e4
    x[2] = 0.0
    x[3, :128] *= 1e-7
    x[-1, -1] = float("nan")
    return x.to(dev)


@pytest.mark.parametrize("group_rows", [1, 128], ids=["1x128", "128x128"])
@pytest.mark.parametrize("pow2", [False, True], ids=["scale", "pow2"])
def test_fp8_quantisation_bit_exact(group_rows, pow2, dev, sizes):
    M, N, K = sizes["gemm"]
    for R, C in ((M, K), (N - 3, K + 77)):
        x = _awkward_matrix(R, C, dev)
        q, s = (F8.quantize_act if group_rows == 1 else F8.quantize_weight)(x, pow2_scale=pow2, backend="triton")
        q_ref, s_ref = ref.quantize_ref(x.cpu(), group_rows, pow2_scale=pow2)
        assert torch.equal(q.view(torch.uint8).cpu(), q_ref.view(torch.uint8)), f"bytes differ at {R}x{C}"
        torch.testing.assert_close(s.cpu(), s_ref, rtol=0, atol=0, equal_nan=True)
        y = F8.dequantize(q, s, backend="triton")
        torch.testing.assert_close(y.cpu(), ref.dequantize_ref(q_ref, s_ref, group_rows), rtol=0, atol=0,
                                   equal_nan=True)


# ---- FP8 GEMMs -------------------------------------------------------------------------------------------------

def _assert_fp8_accum_close(c, want, abs_prod, K, out_dtype):
    """|c − ref| ≤ (K/128 + 8)·u32 + 2⁻¹³ per block of sum |a||b| (+ bf16 rounding)."""
    tol = ((K / 128 + 8) * 2.0 ** -24 + FP8_BLOCK_ACCUM) * abs_prod
    if out_dtype == torch.bfloat16:
        tol = tol + 2.0 ** -8 * want.abs()
    err = (c.double() - want).abs()
    assert c.dtype == out_dtype and bool((err <= tol + 1e-30).all()), f"max excess {(err - tol).max().item():.3g}"


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fp8_gemm_matches_dequantised_reference(out_dtype, dev, sizes):
    M, N, K = sizes["gemm"]
    torch.manual_seed(0)
    x, w = torch.randn(M, K, device=dev), torch.randn(N, K, device=dev) / K ** 0.5
    (xq, xs), (wq, ws) = F8.quantize_act(x), F8.quantize_weight(w)
    c = F8.fp8_gemm(xq, xs, wq, ws, out_dtype, backend="triton")
    a, b = ref.dequantize_ref(xq, xs).double(), ref.dequantize_ref(wq, ws).double()  # fp64 on the device
    _assert_fp8_accum_close(c, a @ b.T, a.abs() @ b.abs().T, K, out_dtype)
    assert 0.01 < rel_err(c.float(), x @ w.T) < 0.06  # the FP8 recipe's own error against fp32


def test_fp8_gemm_backward_operand_forms(dev, sizes):
    """dX: B = Wᵀ as a strided view with transposed block scales; dW: both operands with 1×128 row scales."""
    M, N, K = sizes["gemm"]
    torch.manual_seed(1)
    dy, w, x = torch.randn(M, N, device=dev), torch.randn(N, K, device=dev), torch.randn(M, K, device=dev)
    for (aq, as_), (bq, bs) in (
            (F8.quantize_act(dy), tuple(t.t() for t in F8.quantize_weight(w))),
            (F8.quantize_act(dy.t()), F8.quantize_act(x.t()))):
        c = F8.fp8_gemm(aq, as_, bq, bs, torch.float32, backend="triton")
        a, b = ref.dequantize_ref(aq, as_).double(), ref.dequantize_ref(bq, bs).double()
        _assert_fp8_accum_close(c, a @ b.T, a.abs() @ b.abs().T, aq.shape[1], torch.float32)


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fp8_grouped_gemms_match_grouped_reference(out_dtype, dev, sizes):
    """Ragged expert segments, empty ones included: the forward grouped GEMM and the weight-gradient one."""
    counts, N, K = sizes["grouped"], 512, 640
    torch.manual_seed(2)
    offs = torch.tensor([0] + counts).cumsum(0)
    x, w = torch.randn(int(offs[-1]), K, device=dev), torch.randn(len(counts), N, K, device=dev)
    (xq, xs), (wq, ws) = F8.quantize_act(x), F8.quantize_weight(w)
    c = F8.fp8_grouped_gemm(xq, xs, wq, ws, offs.to(dev), out_dtype, backend="triton")
    cpu = [t.cpu() for t in (xq, xs, wq, ws)]
    want = ref.fp8_grouped_gemm_ref(*cpu, offs, torch.float64)
    absq = lambda q: q.float().abs().to(torch.float8_e4m3fn)  # noqa: E731  (exact: the grid is symmetric)
    abs_prod = ref.fp8_grouped_gemm_ref(absq(cpu[0]), cpu[1], absq(cpu[2]), cpu[3], offs, torch.float64)
    _assert_fp8_accum_close(c.cpu(), want, abs_prod, K, out_dtype)

    dy = torch.randn(x.shape[0], N, device=dev)
    (aq, as_), (bq, bs) = F8.quantize_act(dy.t()), F8.quantize_act(x.t())
    dw = resolve("fp8_kgrouped_gemm", "triton")(aq, as_, bq, bs, offs.to(dev), torch.float32)
    cpu = [t.cpu() for t in (aq, as_, bq, bs)]
    want = ref.fp8_kgrouped_gemm_ref(*cpu, offs, torch.float64)
    abs_prod = ref.fp8_kgrouped_gemm_ref(absq(cpu[0]), cpu[1], absq(cpu[2]), cpu[3], offs, torch.float64)
    tol = (max(counts) / 128 + 8) * 2.0 ** -24 * abs_prod + FP8_BLOCK_ACCUM * abs_prod
    assert bool(((dw.cpu().double() - want).abs() <= tol + 1e-30).all())
    assert not dw[0].any() and not dw[4].any()  # experts without tokens get a zero gradient


def test_fp8_matches_transformer_engine_blockwise_recipe(dev):
    """Transformer Engine's Float8BlockScaling (the DeepSeek 1×128 / 128×128 recipe) as a peer, where installed."""
    if dev.type != "cuda":
        pytest.skip("Transformer Engine runs only on CUDA")
    te = pytest.importorskip("transformer_engine.pytorch", reason="transformer-engine not installed (kdarch[gpu])")
    from transformer_engine.common import recipe
    if not hasattr(recipe, "Float8BlockScaling"):
        pytest.skip("this Transformer Engine has no Float8BlockScaling recipe")
    torch.manual_seed(3)
    x = torch.randn(1024, 2048, device=dev, dtype=torch.bfloat16)
    lin = te.Linear(2048, 1024, bias=False, params_dtype=torch.bfloat16, device=dev)
    with te.fp8_autocast(enabled=True, fp8_recipe=recipe.Float8BlockScaling()):
        y_te = lin(x)
    y = F8.fp8_linear(x, lin.weight.detach())
    y32 = x.float() @ lin.weight.float().T
    errs = rel_err(y.float(), y32), rel_err(y_te.float(), y32), rel_err(y.float(), y_te.float())
    print(f"FP8 vs fp32: kdarch {errs[0]:.4f}, Transformer Engine {errs[1]:.4f}; kdarch vs TE {errs[2]:.4f}")
    assert all(e < 0.06 for e in errs)
