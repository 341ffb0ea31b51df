"""kdarch.ops.moe_ffn against the fp32 reference, forward and backward, on awkward shapes.

Legend: T tokens, K top-k, E experts, H hidden, I expert intermediate, M = T*K rows.
"""

import pytest
import torch

from kdarch import ops
from kdarch.kernels.moe_ref import moe_ffn_ref, routing_metadata_ref
from kdarch.kernels.testing import (MOE_CASE_IDS, MOE_CASES, MOE_GRAD_NAMES, fwd_bwd, make_ids, make_inputs,
                                    moe_ffn_lowp)
from kdarch.kernels.testing import max_rel_err as rel_err
from kdarch.ops import backend as ops_backend
from kdarch.ops.moe import grouped_mm_ok, moe_ffn_torch, routing_metadata

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
        got = fwd_bwd(lambda *a: moe_ffn_torch(*a, impl=impl), *inp)
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
        got = fwd_bwd(lambda *a: moe_ffn_torch(*a, impl=impl), *inp)
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
    ("x_1d", dict(x_TH=torch.randn(32)), r"x must be a 2-D float tensor \[T, H\]"),
    ("x_int", dict(x_TH=torch.ones(5, 32, dtype=torch.int64)), r"x must be a 2-D float"),
    ("ids_float", dict(topk_ids_TK=torch.zeros(5, 2)), r"topk_ids must be int64/int32 \[T=5, K\]"),
    ("ids_wrong_T", dict(topk_ids_TK=torch.zeros(4, 2, dtype=torch.int64)), r"\[T=5, K\]"),
    ("weights_shape", dict(topk_weights_TK=torch.rand(5, 3)), r"topk_weights must be a float tensor \[T=5, K=2\]"),
    ("weights_int", dict(topk_weights_TK=torch.ones(5, 2, dtype=torch.int64)), r"topk_weights must be a float"),
    ("w_gate_up_H", dict(w_gate_up_E2IH=torch.randn(4, 32, 31)), r"w_gate_up must be \[E, 2I, H=32\]"),
    ("w_gate_up_odd", dict(w_gate_up_E2IH=torch.randn(4, 31, 32)), r"w_gate_up must be \[E, 2I, H=32\]"),
    ("w_down_shape", dict(w_down_EHI=torch.randn(4, 32, 8)), r"w_down must be \[E=4, H=32, I=16\]"),
    ("w_dtype", dict(w_down_EHI=torch.randn(4, 32, 16, dtype=torch.float64)), r"w_down dtype must match x"),
    ("id_too_big", dict(topk_ids_TK=torch.tensor([[0, 4]] * 5)), r"topk_ids must lie in \[0, E=4\), got values in \[0, 4\]"),
    ("id_negative", dict(topk_ids_TK=torch.tensor([[-1, 0]] * 5)), r"\[0, E=4\)"),
    ("device", dict(topk_weights_TK=torch.rand(5, 2, device="meta")), r"all inputs must be on one device"),
]


@pytest.mark.parametrize("repl,match", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_inputs_raise_helpful_errors(repl, match):
    with pytest.raises(ValueError, match=match):
        ops.moe_ffn(*_bad(**repl))


def test_non_tensor_input_raises_type_error():
    x, ids, w, wgu, wd = make_inputs(5, 32, 16, 4, 2, "random")
    with pytest.raises(TypeError, match="topk_ids must be a torch.Tensor, got list"):
        ops.moe_ffn(x, ids.tolist(), w, wgu, wd)


def test_backend_selection(monkeypatch):
    inp = make_inputs(7, 32, 16, 4, 2, "random")
    want = moe_ffn_torch(*inp)
    monkeypatch.delenv("KDARCH_BACKEND", raising=False)
    assert torch.equal(ops.moe_ffn(*inp, backend="torch"), want)
    assert torch.equal(ops.moe_ffn(*inp, backend="auto"), want)
    for env in ("torch", "auto", "TORCH"):
        monkeypatch.setenv("KDARCH_BACKEND", env)
        assert torch.equal(ops.moe_ffn(*inp), want)
    monkeypatch.setenv("KDARCH_BACKEND", "nope")
    with pytest.raises(ValueError, match=r"unknown backend KDARCH_BACKEND='nope'.*available for this op: \['torch'"):
        ops.moe_ffn(*inp)
    assert torch.equal(ops.moe_ffn(*inp, backend="torch"), want)  # per-call beats env
    with pytest.raises(ValueError, match=r"unknown backend backend='cuda'.*\['torch'"):
        ops.moe_ffn(*inp, backend="cuda")
    if "cpp" not in ops_backend.available_backends("moe_ffn"):
        with pytest.raises(ValueError, match=r"backend='cpp' is .* for op 'moe_ffn'; available: .*'torch'"):
            ops.moe_ffn(*inp, backend="cpp")


def test_registry_auto_order_and_availability(monkeypatch):
    monkeypatch.setitem(ops_backend._REGISTRY, "_toy", {})
    monkeypatch.delenv("KDARCH_BACKEND", raising=False)
    ops_backend.register("_toy", "torch", lambda: "torch")
    ops_backend.register("_toy", "triton", lambda: "triton", available=lambda: True)
    ops_backend.register("_toy", "cpp", lambda: "cpp", available=lambda: False)
    assert ops_backend.resolve("_toy", None, torch.device("cuda"))() == "triton"  # preferred on CUDA
    assert ops_backend.resolve("_toy", None, "cpu")() == "torch"  # cpp unavailable, triton not auto on CPU
    assert ops_backend.resolve("_toy", "triton", "cpu")() == "triton"  # explicit request is honoured
    with pytest.raises(ValueError, match=r"'cpp' is unavailable here .*available: \['torch', 'triton'\]"):
        ops_backend.resolve("_toy", "cpp", "cpu")
    with pytest.raises(ValueError, match="backend must be one of"):
        ops_backend.register("_toy", "cuda", lambda: None)
