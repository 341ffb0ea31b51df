"""The compiled MoE dispatch ops against references written here or in kdarch.kernels.moe_ref.

Routing must equal routing_metadata_ref exactly (with and without block padding); permute is a gather
(exact); the combine must equal an fp32 loop over the K slots in order (exact: the op promises that order),
forward and backward; every op gives the same bits with 1 and 2 threads.

Legend: T tokens, K top-k, E experts, H row width, M = T*K rows, P padded rows.
"""
import pytest
import torch

from kdarch.kernels.moe_ref import routing_metadata_ref
from kdarch.kernels.testing import MOE_CASE_IDS, MOE_CASES, make_ids
from kdarch.ops.cpp import ops as C

ROUTING_CASES = [c[1:2] + c[4:] for c in MOE_CASES] + [(2000, 64, 8, "random"), (3000, 256, 4, "random")]
ROUTING_IDS = MOE_CASE_IDS + ["2000tok_64exp", "3000tok_256exp"]


def ids_for(T, E, K, routing, seed=0):
    return make_ids(T, E, K, routing, torch.Generator().manual_seed(seed))


def combine_loop(src_PH, inv_M, K, w_TK=None):
    """out[t] = sum over k in order of (w[t, k] *) src[inv[t*K + k]], each step rounded to fp32."""
    rows = src_PH.float()[inv_M].view(-1, K, src_PH.shape[1])
    out = torch.zeros(rows.shape[0], rows.shape[2])
    for k in range(K):
        out = out + (rows[:, k] if w_TK is None else w_TK[:, k:k + 1].float() * rows[:, k])
    return out


@pytest.mark.parametrize("case", ROUTING_CASES, ids=ROUTING_IDS)
@pytest.mark.parametrize("id_dtype", [torch.int64, torch.int32])
def test_routing_equals_reference(lib, case, id_dtype, threads):
    T, E, K, routing = case
    ids = ids_for(T, E, K, routing).to(id_dtype)
    want = routing_metadata_ref(ids, E)
    for n in (1, 2):
        got = threads(n, lib.moe_routing, ids, E, 1)
        for a, r in zip(got, want):
            assert a.dtype == torch.int64 and torch.equal(a, r)


@pytest.mark.parametrize("pad_to", [1, 4, 16, 128])
@pytest.mark.parametrize("case", [(9, 5, 2, "skip0"), (7, 5, 1, "one"), (1, 7, 1, "random"), (500, 16, 4, "random")])
def test_routing_padded_segments(lib, case, pad_to):
    T, E, K, routing = case
    ids = ids_for(T, E, K, routing, seed=2)
    counts, offsets, sorted_idx, inv = lib.moe_routing(ids, E, pad_to)
    r_counts, r_offsets, r_sorted, _ = routing_metadata_ref(ids, E)
    M = T * K
    assert torch.equal(counts, r_counts) and sorted_idx.numel() == (M if pad_to == 1 else M + E * (pad_to - 1))
    seg = (r_counts + pad_to - 1) // pad_to * pad_to
    assert offsets[0] == 0 and torch.equal(offsets[1:], seg.cumsum(0)) and bool((offsets % pad_to == 0).all())
    for e in range(E):
        lo, n = int(offsets[e]), int(r_counts[e])
        assert torch.equal(sorted_idx[lo:lo + n], r_sorted[r_offsets[e]:r_offsets[e + 1]])
        assert bool((sorted_idx[lo + n:int(offsets[e + 1])] == -1).all())
    assert bool((sorted_idx[int(offsets[-1]):] == -1).all())
    assert torch.equal(sorted_idx[inv], torch.arange(M))


def test_routing_rejects_bad_input(lib):
    with pytest.raises(RuntimeError, match=r"moe_routing: topk_ids: expected expert ids in \[0, 4\), got 4 at flat "
                                           r"index 3"):
        lib.moe_routing(torch.tensor([[0, 1], [2, 4]]), 4, 1)
    with pytest.raises(RuntimeError, match=r"moe_routing: topk_ids: expected an int64/int32 tensor, got Float"):
        lib.moe_routing(torch.zeros(2, 2), 4, 1)
    with pytest.raises(RuntimeError, match=r"moe_routing: pad_to: expected an int >= 1, got 0"):
        lib.moe_routing(torch.zeros(2, 2, dtype=torch.long), 4, 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", [(1, 4, 1, 32), (7, 7, 7, 97), (33, 5, 2, 64), (300, 16, 4, 130)])
def test_permute_and_combine_forward_backward(lib, case, dtype, threads):
    T, E, K, H = case
    g = torch.Generator().manual_seed(3)
    ids = ids_for(T, E, K, "random")
    _, _, sorted_idx, inv = lib.moe_routing(ids, E, 1)
    x = torch.randn(T, H, generator=g).to(dtype)
    w = torch.rand(T, K, generator=g)
    # permute: a plain gather (exact, any dtype); with weights, the product rounded once to the dtype
    xp = C.permute(x, sorted_idx, inv, K)
    assert xp.dtype == dtype and torch.equal(xp, x[sorted_idx // K])
    xpw = lib.moe_permute(x, sorted_idx, K, w)
    assert torch.equal(xpw, (x.float()[sorted_idx // K] * w.reshape(-1)[sorted_idx, None]).to(dtype))
    # combine: the fp32 loop, bit for bit, at 1 and 2 threads
    y = torch.randn(T * K, H, generator=g).to(dtype).requires_grad_()
    wr = w.clone().requires_grad_()
    for n in (1, 2):
        out = threads(n, C.unpermute, y, inv, sorted_idx, K, wr, torch.float32)
        assert torch.equal(out, combine_loop(y.detach(), inv, K, w))
        assert torch.equal(threads(n, C.unpermute, y.detach(), inv, sorted_idx, K), combine_loop(y.detach(), inv, K)
                           .to(dtype))
    # backward against autograd through the reference (one multiply per element: exact; the weight gradient is
    # a dot product over H: fp32 rounding)
    go = torch.randn(T, H, generator=g)
    gy, gw = torch.autograd.grad(C.unpermute(y, inv, sorted_idx, K, wr, torch.float32), (y, wr), go)
    yr, wrr = y.detach().float().requires_grad_(), w.clone().requires_grad_()
    gy_ref, gw_ref = torch.autograd.grad(combine_loop(yr, inv, K, wrr), (yr, wrr), go)
    assert gy.dtype == dtype and torch.equal(gy, gy_ref.to(dtype))
    torch.testing.assert_close(gw, gw_ref, rtol=1e-5, atol=1e-5 * H ** 0.5)
    gw1 = threads(1, lib.moe_unpermute_weights_grad, go, y.detach(), inv, K)
    assert torch.equal(gw1, threads(2, lib.moe_unpermute_weights_grad, go, y.detach(), inv, K))
    # permute's backward sums each token's K copies in slot order
    xr = x.clone().requires_grad_()
    gp = torch.randn(T * K, H, generator=g).to(dtype)
    (gx,) = torch.autograd.grad(C.permute(xr, sorted_idx, inv, K), xr, gp)
    assert torch.equal(gx, combine_loop(gp, inv, K).to(dtype))


def test_pad_rows_are_zero_and_get_no_gradient(lib):
    T, E, K, H = 9, 5, 2, 8
    ids = ids_for(T, E, K, "skip0", seed=2)
    _, _, sorted_idx, inv = lib.moe_routing(ids, E, 16)
    x = torch.randn(T, H)
    xp = lib.moe_permute(x, sorted_idx, K)
    valid = sorted_idx >= 0
    assert torch.equal(xp[valid], x[sorted_idx[valid] // K]) and not xp[~valid].any()
    y = torch.randn(sorted_idx.numel(), H, requires_grad=True)
    out = C.unpermute(y, inv, sorted_idx, K)
    assert torch.equal(out, combine_loop(y.detach(), inv, K))
    (gy,) = torch.autograd.grad(out, y, torch.ones(T, H))
    assert not gy[~valid].any() and bool((gy[valid] == 1).all())


def test_permute_and_combine_reject_bad_indices(lib):
    x = torch.randn(3, 4)
    with pytest.raises(RuntimeError, match=r"moe_permute: idx: expected slot indices < 6 \(or -1 for a pad row\), "
                                           r"got 6"):
        lib.moe_permute(x, torch.tensor([0, 6]), 2)
    with pytest.raises(RuntimeError, match=r"moe_unpermute: inv_idx: expected row indices in \[0, 3\), got 3"):
        lib.moe_unpermute(x, torch.tensor([0, 3]), 1)
    with pytest.raises(RuntimeError, match=r"moe_unpermute: K: expected an int >= 1 dividing inv_idx's length 3, "
                                           r"got 2"):
        lib.moe_unpermute(x, torch.tensor([0, 1, 2]), 2)
    with pytest.raises(RuntimeError, match=r"moe_permute: idx: expected a 1-D int64 tensor, got Int"):
        lib.moe_permute(x, torch.tensor([0, 1], dtype=torch.int32), 1)


def test_moe_ops_pass_opcheck(lib):
    ids = ids_for(13, 6, 3, "random")
    _, _, sorted_idx, inv = lib.moe_routing(ids, 6, 1)
    _, _, sorted_pad, _ = lib.moe_routing(ids, 6, 8)
    x, y, w = torch.randn(13, 24), torch.randn(39, 24), torch.rand(13, 3)
    for op, args in [(lib.moe_routing, (ids, 6, 1)), (lib.moe_routing, (ids.int(), 6, 8)),
                     (lib.moe_permute, (x, sorted_idx, 3)), (lib.moe_permute, (x, sorted_pad, 3, w)),
                     (lib.moe_unpermute, (y, inv, 3, w, torch.float32)), (lib.moe_unpermute, (y.bfloat16(), inv, 3)),
                     (lib.moe_unpermute_weights_grad, (x, y, inv, 3))]:
        torch.library.opcheck(op, args)
