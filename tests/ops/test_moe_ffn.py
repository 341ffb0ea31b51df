"""kdarch.ops.moe_ffn against the fp32 reference, forward and backward, on awkward shapes.

Legend: T tokens, K top-k, E experts, H hidden, I expert intermediate, M = T*K rows.
"""

import pytest
import torch

from kdarch import ops
from kdarch.checks import set_value_checks
from kdarch.kernels.moe_ref import moe_ffn_ref, routing_metadata_ref
from kdarch.kernels.testing import MOE_CASE_IDS, MOE_CASES, MOE_GRAD_NAMES, fwd_bwd, make_ids, make_inputs, moe_ffn_lowp
from kdarch.kernels.testing import max_rel_err as rel_err
from kdarch.ops import backend as ops_backend
from kdarch.ops import moe as ops_moe
from kdarch.ops.moe import routing_metadata, torch_backend
from kdarch.ops.moe.torch_backend import few_rows, grouped_mm_ok, moe_ffn_fp8_torch, moe_ffn_gathered, moe_ffn_torch

CASES, IDS = MOE_CASES, MOE_CASE_IDS


def impls_for(H, I, dtype=torch.float32):
    wgu, wd = torch.empty(1, 2 * I, H, dtype=dtype), torch.empty(1, H, I, dtype=dtype)
    return ["auto", "padded_bmm"] + (["grouped_mm"] if grouped_mm_ok(dtype, wgu, wd) else [])


NAMES = MOE_GRAD_NAMES


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_fp32_matches_reference(case):
    _, T, H, I, E, K, routing = case
    inp = make_inputs(T, H, I, E, K, routing)
    ref = fwd_bwd(moe_ffn_ref, *inp)
    for impl in impls_for(H, I):
        got = fwd_bwd(lambda *a, impl=impl: moe_ffn_torch(*a, impl=impl), *inp)
        for name, a, r in zip(NAMES, got, ref):
            assert rel_err(a, r) < 1e-5, f"{impl} {name}: rel err {rel_err(a, r):.2e}"
    # the public entry point dispatches to the same thing
    pub = fwd_bwd(ops.moe_ffn, *inp)
    assert all(rel_err(a, r) < 1e-5 for a, r in zip(pub, ref))


@pytest.mark.parametrize("case", [CASES[1], CASES[2], CASES[4], CASES[6]], ids=[IDS[1], IDS[2], IDS[4], IDS[6]])
def test_bf16_error_within_2x_torch_bf16(case):
    _, T, H, I, E, K, routing = case
    inp = make_inputs(T, H, I, E, K, routing, dtype=torch.bfloat16)
    ref = fwd_bwd(moe_ffn_ref, inp[0].float(), inp[1], inp[2], inp[3].float(), inp[4].float())
    base = fwd_bwd(moe_ffn_lowp, *inp)
    for impl in impls_for(H, I, torch.bfloat16):
        got = fwd_bwd(lambda *a, impl=impl: moe_ffn_torch(*a, impl=impl), *inp)
        for name, a, b, r in zip(NAMES, got, base, ref):
            err, bar = rel_err(a, r), rel_err(b, r)
            assert err <= 2 * bar + 5e-4, f"{impl} {name}: err {err:.2e} > 2 x torch-bf16 {bar:.2e} + 5e-4"
    out = ops.moe_ffn(*inp)
    assert out.dtype == torch.bfloat16 and out.shape == (T, H)


@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize("id_dtype", [torch.int64, torch.int32])
def test_routing_metadata_invariants(case, id_dtype):
    _, T, H, I, E, K, routing = case
    ids = make_ids(T, E, K, routing, torch.Generator().manual_seed(0)).to(id_dtype)
    ref = routing_metadata_ref(ids, E)
    got = routing_metadata(ids, E)
    for a, r in zip(got, ref):
        assert a.dtype == torch.int64 and torch.equal(a, r)
    counts, offsets, sorted_idx, inv = got
    M, ar = T * K, torch.arange(T * K)
    assert counts.shape == (E,) and offsets.shape == (E + 1,) and int(counts.sum()) == M
    assert torch.equal(offsets, torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)]))
    assert torch.equal(sorted_idx[inv], ar) and torch.equal(inv[sorted_idx], ar)
    ids_sorted = ids.reshape(-1).long()[sorted_idx]
    assert torch.equal(ids_sorted, torch.repeat_interleave(torch.arange(E), counts))
    for e in range(E):  # stable: token order kept inside each expert's segment
        seg = sorted_idx[offsets[e]:offsets[e + 1]]
        assert bool((seg[1:] > seg[:-1]).all())
    if routing == "skip0":
        assert counts[0] == 0


@pytest.mark.parametrize("T, K, E, routing", [(1, 4, 16, "random"), (2, 4, 16, "random"), (4, 2, 8, "one"),
                                              (3, 1, 5, "skip0")])
@pytest.mark.parametrize("backend", ["torch", "cpp"])
@pytest.mark.parametrize("host_read", [True, False], ids=["rows-in-place", "gathered-weights"])
def test_decode_shapes_take_the_gathered_path(T, K, E, routing, backend, host_read, monkeypatch):
    """A few rows (T * K <= E) without autograd: the few-rows path, equal to the reference, both as the CPU runs
    it (each row against its expert's weights in place) and as a GPU does (weights gathered, no host read);
    with autograd the grouped path (training never gathers weights)."""
    if backend not in ops.available_backends("moe_ffn"):
        pytest.skip("the compiled ops do not build here")
    if not host_read:
        monkeypatch.setattr(torch_backend, "HOST_READ_DEVICES", ())
    x, ids, w, wgu, wd = make_inputs(T, 24, 16, E, K, routing)
    assert few_rows(x, ids, wgu) and not few_rows(x.requires_grad_(), ids, wgu)
    x = x.detach()
    with torch.no_grad():
        got = ops.moe_ffn(x, ids, w, wgu, wd, backend=backend)
    assert torch.equal(got, moe_ffn_gathered(x, ids, w, wgu, wd))
    assert rel_err(got, moe_ffn_ref(x, ids, w, wgu, wd)) < 1e-6
    for a, r in zip(fwd_bwd(moe_ffn_gathered, x, ids, w, wgu, wd), fwd_bwd(moe_ffn_ref, x, ids, w, wgu, wd)):
        assert rel_err(a, r) < 1e-5  # differentiable too, though only inference takes it


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_no_tokens(backend):
    """An expert-parallel rank can be sent no tokens at all."""
    if backend not in ops.available_backends("moe_ffn"):
        pytest.skip("the compiled ops do not build here")
    _, _, _, wgu, wd = make_inputs(1, 24, 16, 8, 2, "random")
    x, ids, w = torch.empty(0, 24), torch.empty(0, 2, dtype=torch.long), torch.empty(0, 2)
    with torch.no_grad():
        assert ops.moe_ffn(x, ids, w, wgu, wd, backend=backend).shape == (0, 24)
    assert fwd_bwd(lambda *a: ops.moe_ffn(*a, backend=backend), x, ids, w, wgu, wd)[0].shape == (0, 24)


def test_int32_ids_and_broadcast_grad():
    x, ids, w, wgu, wd = make_inputs(7, 32, 16, 4, 2, "random")
    torch.testing.assert_close(ops.moe_ffn(x, ids.int(), w, wgu, wd), ops.moe_ffn(x, ids, w, wgu, wd),
                               rtol=0, atol=0)
    xr = x.clone().requires_grad_()
    ops.moe_ffn(xr, ids, w, wgu, wd).sum().backward()  # an expanded (stride-0) output grad
    ref_x = x.clone().requires_grad_()
    moe_ffn_ref(ref_x, ids, w, wgu, wd).sum().backward()
    assert rel_err(xr.grad, ref_x.grad) < 1e-5


@pytest.mark.parametrize("impl", ["grouped_mm", "padded_bmm"])
def test_deterministic(impl):
    inp = make_inputs(64, 32, 16, 6, 3, "random", seed=3)
    run1 = fwd_bwd(lambda *a: moe_ffn_torch(*a, impl=impl), *inp)
    run2 = fwd_bwd(lambda *a: moe_ffn_torch(*a, impl=impl), *inp)
    assert all(torch.equal(a, b) for a, b in zip(run1, run2))


def _bad(**repl):
    x, ids, w, wgu, wd = make_inputs(5, 32, 16, 4, 2, "random")
    args = dict(x_TH=x, topk_ids_TK=ids, topk_weights_TK=w, w_gate_up_E2IH=wgu, w_down_EHI=wd)
    args.update(repl)
    return list(args.values())


BAD = [
    ("x_1d", dict(x_TH=torch.randn(32)),
     r"^moe_ffn: x: expected a 2-D float tensor \[T, H\], got a float32 tensor of shape \(32,\)$"),
    ("x_int", dict(x_TH=torch.ones(5, 32, dtype=torch.int64)),
     r"^moe_ffn: x: expected a 2-D float tensor \[T, H\], got an int64 tensor of shape \(5, 32\)$"),
    ("ids_float", dict(topk_ids_TK=torch.zeros(5, 2)),
     r"^moe_ffn: topk_ids: expected an int64/int32 tensor \[T=5, K\], got a float32 tensor of shape \(5, 2\)$"),
    ("ids_wrong_T", dict(topk_ids_TK=torch.zeros(4, 2, dtype=torch.int64)),
     r"^moe_ffn: topk_ids: expected an int64/int32 tensor \[T=5, K\], got an int64 tensor of shape \(4, 2\)$"),
    ("weights_shape", dict(topk_weights_TK=torch.rand(5, 3)),
     r"^moe_ffn: topk_weights: expected a float tensor \[T=5, K=2\], got a float32 tensor of shape \(5, 3\)$"),
    ("weights_int", dict(topk_weights_TK=torch.ones(5, 2, dtype=torch.int64)),
     r"^moe_ffn: topk_weights: expected a float tensor \[T=5, K=2\], got an int64 tensor"),
    ("w_gate_up_H", dict(w_gate_up_E2IH=torch.randn(4, 32, 31)),
     r"^moe_ffn: w_gate_up: expected a tensor \[E, 2I, H=32\] \(gate rows, then up rows\), got .* \(4, 32, 31\)$"),
    ("w_gate_up_odd", dict(w_gate_up_E2IH=torch.randn(4, 31, 32)),
     r"^moe_ffn: w_gate_up: expected a tensor \[E, 2I, H=32\] .*, got .* \(4, 31, 32\)$"),
    ("w_down_shape", dict(w_down_EHI=torch.randn(4, 32, 8)),
     r"^moe_ffn: w_down: expected a tensor \[E=4, H=32, I=16\], got a float32 tensor of shape \(4, 32, 8\)$"),
    ("w_dtype", dict(w_down_EHI=torch.randn(4, 32, 16, dtype=torch.float64)),
     r"^moe_ffn: w_down: expected the dtype of x \(torch.float32\), got a float64 tensor"),
    ("id_too_big", dict(topk_ids_TK=torch.tensor([[0, 4]] * 5)),
     r"^moe_ffn: topk_ids: expected expert ids in \[0, 4\), got 4$"),
    ("id_negative", dict(topk_ids_TK=torch.tensor([[-1, 0]] * 5)),
     r"^moe_ffn: topk_ids: expected expert ids in \[0, 4\), got -1$"),
    ("device", dict(topk_weights_TK=torch.rand(5, 2, device="meta")),
     r"^moe_ffn: inputs: expected all on one device, got \{'x': 'cpu', 'topk_ids': 'cpu', 'topk_weights': 'meta'"),
]


@pytest.mark.parametrize("fp8", [False, True], ids=["bf16_fp32", "fp8"])
@pytest.mark.parametrize("repl,match", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_inputs_raise_helpful_errors(repl, match, fp8):
    with pytest.raises(ValueError, match=match):
        ops.moe_ffn(*_bad(**repl), fp8=fp8)


def test_non_tensor_input_raises_type_error():
    x, ids, w, wgu, wd = make_inputs(5, 32, 16, 4, 2, "random")
    with pytest.raises(TypeError, match=r"^moe_ffn: topk_ids: expected a torch.Tensor, got \[\["):
        ops.moe_ffn(x, ids.tolist(), w, wgu, wd)


def test_expert_id_range_is_a_value_check():
    """The id range needs the values on the host: checked only where kdarch.checks.value_checks_on says so;
    shapes and dtypes are checked always."""
    bad_ids = _bad(topk_ids_TK=torch.tensor([[0, 4]] * 5))
    bad_shape = _bad(topk_weights_TK=torch.rand(5, 3))
    try:
        set_value_checks(False)
        ops_moe._check_inputs(*bad_ids)  # no value check, so no error
        with pytest.raises(ValueError, match="topk_weights: expected"):
            ops_moe._check_inputs(*bad_shape)
        set_value_checks(True)
        with pytest.raises(ValueError, match=r"expert ids in \[0, 4\)"):
            ops_moe._check_inputs(*bad_ids)
    finally:
        set_value_checks(None)


def test_backend_selection(monkeypatch):
    inp = make_inputs(7, 32, 16, 4, 2, "random")
    want = moe_ffn_torch(*inp)
    monkeypatch.delenv("KDARCH_BACKEND", raising=False)
    assert torch.equal(ops.moe_ffn(*inp, backend="torch"), want)
    auto_want = ops.resolve("moe_ffn", "auto", "cpu")(*inp)  # cpp where it builds: its SwiGLU rounds differently
    assert torch.equal(ops.moe_ffn(*inp, backend="auto"), auto_want)
    for env in ("torch", "auto", "TORCH"):
        monkeypatch.setenv("KDARCH_BACKEND", env)
        assert torch.equal(ops.moe_ffn(*inp), auto_want if env == "auto" else want)
    monkeypatch.setenv("KDARCH_BACKEND", "nope")
    with pytest.raises(ValueError, match=r"^moe_ffn: KDARCH_BACKEND: expected one of 'torch', 'triton', 'cpp', "
                                         r"'auto' \(available for this op here: \['torch'.*\]\), got 'nope'$"):
        ops.moe_ffn(*inp)
    with pytest.raises(ValueError, match=r"^moe_ffn_fp8: KDARCH_BACKEND: expected one of .*, got 'nope'$"):
        ops.moe_ffn(*inp, fp8=True)  # the FP8 op follows the same rules
    assert torch.equal(ops.moe_ffn(*inp, backend="torch"), want)  # per-call beats env
    with pytest.raises(ValueError, match=r"^moe_ffn: backend: expected one of 'torch', 'triton', 'cpp', 'auto' "
                                         r"\(available for this op here: \['torch'.*, got 'cuda'$"):
        ops.moe_ffn(*inp, backend="cuda")  # a device is not a backend
    assert ops_backend.BACKENDS == ("torch", "triton", "cpp")


def test_fp8_resolves_its_own_op(monkeypatch):
    """moe_ffn(fp8=True) is the registry op "moe_ffn_fp8", picked like every other op (no bypass)."""
    monkeypatch.setenv("KDARCH_BACKEND", "torch")  # auto prefers "cpp" on the CPU where it is built
    inp = make_inputs(7, 32, 16, 4, 2, "random")
    assert ops.resolve("moe_ffn_fp8", None, "cpu") is moe_ffn_fp8_torch
    calls = []
    monkeypatch.setitem(ops_backend._REGISTRY["moe_ffn_fp8"], "torch",
                        (lambda *a: calls.append(len(a)) or moe_ffn_fp8_torch(*a), None))
    out = ops.moe_ffn(*inp, fp8=True)
    assert calls == [5] and out.shape == (7, 32) and out.dtype == torch.float32
    assert not torch.equal(out, moe_ffn_torch(*inp))  # FP8 rounding shows
    assert rel_err(out, moe_ffn_ref(*inp)) < 0.08


def test_registry_auto_order_and_availability(monkeypatch):
    monkeypatch.setitem(ops_backend._REGISTRY, "_toy", {})
    monkeypatch.setitem(ops_backend._REGISTRY, "_toy_off", {})
    monkeypatch.delenv("KDARCH_BACKEND", raising=False)
    ops_backend.register("_toy", "torch", lambda: "torch")
    ops_backend.register("_toy", "triton", lambda: "triton", available=lambda: True)
    ops_backend.register("_toy_off", "torch", lambda: "torch")
    ops_backend.register("_toy_off", "triton", lambda: "triton", available=lambda: False)
    assert ops_backend.resolve("_toy", None, torch.device("cuda"))() == "triton"  # preferred on CUDA
    assert ops_backend.resolve("_toy", None, "cpu")() == "torch"  # triton is never auto-picked on the CPU
    assert ops_backend.resolve("_toy", "triton", "cpu")() == "triton"  # explicit request is honoured
    assert ops_backend.resolve("_toy_off", None, "cuda")() == "torch"  # unavailable: auto falls through
    assert ops_backend.available_backends("_toy_off") == ["torch"]
    with pytest.raises(ValueError, match=r"^_toy_off: backend: expected an available backend, one of \['torch'\] "
                                         r"\('triton' is unavailable here\), got 'triton'$"):
        ops_backend.resolve("_toy_off", "triton", "cpu")
    with pytest.raises(ValueError, match=r"^register: backend_name: expected one of 'torch', 'triton', 'cpp', "
                                         r"got 'cuda'$"):
        ops_backend.register("_toy", "cuda", lambda: None)
    with pytest.raises(ValueError, match=r"^resolve: op_name: expected a registered op, one of \[.*'moe_ffn'"):
        ops_backend.resolve("_no_such_op")


def test_torch_backend_ops_pass_opcheck_and_compile_in_fp32():
    """The grouped-mm FFN is a pair of custom ops with fakes: opcheck passes, and a compiled fp32 MoE (whose
    torch._grouped_mm fake accepts only bf16) traces whole and matches eager, forward and backward."""
    from kdarch.ops.moe.torch_backend import grouped_ffn_bwd, grouped_ffn_fwd
    checks = ("test_schema", "test_autograd_registration", "test_faketensor")
    x, ids, w, wgu, wd = make_inputs(7, 32, 16, 4, 2, "random")
    _, offsets, sorted_idx, inv = routing_metadata(ids, 4)
    ends = offsets[1:].to(torch.int32)
    leaves = [t.clone().requires_grad_() for t in (x, w, wgu, wd)]
    torch.library.opcheck(grouped_ffn_fwd, (*leaves, sorted_idx, inv, ends), test_utils=checks)
    _, h = grouped_ffn_fwd(x, w, wgu, wd, sorted_idx, inv, ends)
    torch.library.opcheck(grouped_ffn_bwd, (torch.randn(7, 32), x, w, wgu, wd, sorted_idx, inv, ends, h),
                          test_utils=checks)
    fn = lambda *a: ops.moe_ffn(*a, backend="torch")  # noqa: E731
    eager = fwd_bwd(fn, x, ids, w, wgu, wd)
    compiled = fwd_bwd(torch.compile(fn, fullgraph=True, backend="aot_eager"), x, ids, w, wgu, wd)
    for name, a, b in zip(MOE_GRAD_NAMES, compiled, eager):
        torch.testing.assert_close(a, b, msg=name)
