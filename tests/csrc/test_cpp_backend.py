"""The "cpp" backend in the registry: moe_ffn / moe_ffn_fp8 and the FP8 ops against the torch backend, the
custom ops under opcheck and torch.compile, and the debug student trained end to end with KDARCH_BACKEND=cpp.

The backends share their dataflow and their reductions' order: the FP8 compositions agree exactly (torch.equal);
the high-precision FFN, whose SwiGLU is compiled (its own exp), to fp32 rounding (bf16: one rounding of an
output). Both are also checked against the fp32 reference (moe_ffn_ref).
"""
import pytest
import torch

from kdarch import CausalLM, get_preset, ops
from kdarch.kernels.moe_ref import moe_ffn_ref
from kdarch.kernels.testing import MOE_CASE_IDS, MOE_CASES, MOE_GRAD_NAMES, fwd_bwd, make_inputs
from kdarch.kernels.testing import max_rel_err as rel_err
from kdarch.ops.moe import cpp_backend as moe_backend
from kdarch.ops.moe.torch_backend import routing_metadata


@pytest.mark.parametrize("case", MOE_CASES, ids=MOE_CASE_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fp8", [False, True])
def test_moe_ffn_cpp_equals_torch_backend(lib, case, dtype, fp8):
    _, T, H, I, E, K, routing = case
    inp = make_inputs(T, H, I, E, K, routing, dtype=dtype)
    got = fwd_bwd(lambda *a: ops.moe_ffn(*a, backend="cpp", fp8=fp8), *inp)
    want = fwd_bwd(lambda *a: ops.moe_ffn(*a, backend="torch", fp8=fp8), *inp)
    for name, a, b in zip(MOE_GRAD_NAMES, got, want):
        assert a.dtype == b.dtype, name
        if fp8:
            assert torch.equal(a, b), f"{name} differs from the torch backend"
        else:
            assert rel_err(a, b) < (2e-6 if dtype == torch.float32 else 2e-2), f"{name} differs from the torch backend"
    if dtype == torch.float32:
        ref = fwd_bwd(moe_ffn_ref, *inp)
        for name, a, r in zip(MOE_GRAD_NAMES, got, ref):
            assert rel_err(a, r) < (0.1 if fp8 else 1e-5), name


def test_registry_knows_cpp_and_the_env_picks_it(lib, monkeypatch):
    assert "cpp" in ops.available_backends("moe_ffn") and "cpp" in ops.available_backends("fp8_quantize")
    monkeypatch.setenv("KDARCH_BACKEND", "cpp")
    assert ops.resolve("moe_ffn", None, "cpu") is moe_backend.moe_ffn_cpp
    assert ops.resolve("moe_ffn_fp8", None, "cpu") is moe_backend.moe_ffn_fp8_cpp
    inp = make_inputs(7, 32, 16, 4, 2, "random")
    assert torch.equal(ops.moe_ffn(*inp), ops.moe_ffn(*inp, backend="cpp"))


def test_ffn_custom_ops_pass_opcheck_and_compile(lib):
    checks = ("test_schema", "test_autograd_registration", "test_faketensor")
    x, ids, w, wgu, wd = make_inputs(7, 32, 16, 4, 2, "random")
    _, offsets, sorted_idx, inv = routing_metadata(ids, 4)
    ends = offsets[1:].to(torch.int32)
    leaves = [t.clone().requires_grad_() for t in (x, w, wgu, wd)]
    torch.library.opcheck(moe_backend.cpp_ffn_fwd, (*leaves, sorted_idx, inv, ends), test_utils=checks)
    _, h = moe_backend.cpp_ffn_fwd(x, w, wgu, wd, sorted_idx, inv, ends)
    torch.library.opcheck(moe_backend.cpp_ffn_bwd, (torch.randn(7, 32), x, w, wgu, wd, sorted_idx, inv, ends, h),
                          test_utils=checks)
    for fp8 in (False, True):
        fn = lambda *a, fp8=fp8: ops.moe_ffn(*a, backend="cpp", fp8=fp8)  # noqa: E731
        eager = fwd_bwd(fn, x, ids, w, wgu, wd)
        compiled = fwd_bwd(torch.compile(fn, fullgraph=not fp8, backend="aot_eager"), x, ids, w, wgu, wd)
        for name, a, b in zip(MOE_GRAD_NAMES, compiled, eager):
            torch.testing.assert_close(a, b, msg=name)


def _losses(monkeypatch, backend: str, fp8: bool, steps: int = 4) -> list[float]:
    monkeypatch.setenv("KDARCH_BACKEND", backend)
    torch.manual_seed(0)
    model = CausalLM(get_preset("debug", fp8=fp8))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    data = torch.randint(0, 256, (64,), generator=torch.Generator().manual_seed(1)).repeat(8)
    out = []
    for step in range(steps):
        x = torch.stack([data[i:i + 48] for i in range(step % 8, step % 8 + 4)])
        loss = model(x, labels=x, return_logits=False).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        out.append(loss.item())
    return out


@pytest.mark.parametrize("fp8", [False, True])
def test_debug_student_trains_on_cpp_like_on_torch(lib, monkeypatch, fp8):
    cpp, ref = _losses(monkeypatch, "cpp", fp8), _losses(monkeypatch, "torch", fp8)
    assert cpp[-1] < cpp[0]  # it learns
    assert cpp == ref  # and takes the very same steps
