"""The fused distillation head equals the unfused path `kd_loss(h @ W.T, ...)` (loss, dL/dh, dL/dW) and the
plain-PyTorch formula, for every loss kind and teacher signal, in several chunks; it runs on a kdarch
student's hidden states and output head."""
import pytest
import torch
import torch.nn.functional as F

from kdarch import CausalLM, get_preset
from kdarch.distill import KINDS, DistillationHead, TopKTeacher, fused_kd_loss, kd_loss

IGNORE = -100


def make(N=19, D=12, V=31, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, D, generator=g, dtype=dtype)
    w = torch.randn(V, D, generator=g, dtype=dtype) * D ** -0.5
    t = 2 * torch.randn(N, V, generator=g, dtype=dtype)
    y = torch.randint(0, V, (N,), generator=g)
    y[::4] = IGNORE
    return h, w, t, y


def run(fn, h, w):
    """Loss and gradients w.r.t. h and w under a non-unit upstream gradient."""
    h, w = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    loss = fn(h, w)
    (1.5 * loss).backward()
    return loss.detach(), h.grad, w.grad


def assert_same(a, b, **tol):
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, **tol)


def teachers(t):
    return {"dense": t,
            "tail": TopKTeacher.from_logits(t, 5, mode="tail"),
            "renormalise": TopKTeacher.from_logits(t, 5, mode="renormalise"),
            "k=V": TopKTeacher.from_logits(t, t.shape[-1], mode="tail")}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("signal", ["dense", "tail", "renormalise", "k=V"])
def test_fused_matches_unfused(kind, alpha, signal):
    h, w, t, y = make()
    teacher = teachers(t)[signal]
    opts = dict(kind=kind, temperature=2.0, alpha=alpha, beta=0.3)
    fused = run(lambda h, w: fused_kd_loss(h, w, y, teacher, chunk=4, **opts), h, w)
    naive = run(lambda h, w: kd_loss(h @ w.T, teacher, y, **opts), h, w)
    assert_same(fused, naive)
    if signal == "k=V":  # the top-k signal at k = V is the dense teacher
        assert_same(fused, run(lambda h, w: kd_loss(h @ w.T, t, y, **opts), h, w))


@pytest.mark.parametrize("kind", KINDS)
def test_fused_matches_plain_formula(kind):
    h, w, t, y = make(seed=1)
    T, v = 0.8, y != IGNORE

    def plain(h, w):
        s = h @ w.T
        ls, lt = F.log_softmax(s[v] / T, -1), F.log_softmax(t[v] / T, -1)
        ps, pt = ls.exp(), lt.exp()
        lm = (0.3 * pt + 0.7 * ps).log()
        d = {"forward_kl": (pt * (lt - ls)).sum(-1) * T * T, "reverse_kl": (ps * (ls - lt)).sum(-1) * T * T,
             "jsd": (0.3 * (pt * (lt - lm)).sum(-1) + 0.7 * (ps * (ls - lm)).sum(-1)) * T * T,
             "tvd": 0.5 * (pt - ps).abs().sum(-1)}[kind]
        return 0.5 * d.mean() + 0.5 * F.cross_entropy(s[v], y[v])
    got = run(lambda h, w: fused_kd_loss(h, w, y, t, kind=kind, temperature=T, beta=0.3, chunk=3), h, w)
    assert_same(got, run(plain, h, w))


def test_no_allocation_of_n_by_v():
    """The fused head's largest allocation is one chunk buffer; the unfused path's is [N, V]."""
    h, w, t, y = make(N=256, D=16, V=512)

    def biggest(fn):
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
            fn(hh, ww).backward()
        return max(e.self_cpu_memory_usage for e in prof.events())
    opts = dict(kind="jsd", temperature=2.0)
    assert biggest(lambda h, w: kd_loss(h @ w.T, t, y, **opts)) >= 256 * 512 * 4
    assert biggest(lambda h, w: fused_kd_loss(h, w, y, t, chunk=32, **opts)) <= 32 * 512 * 4


def test_leading_dims_frozen_weight_and_no_grad():
    h, w, t, y = make(N=12)
    h3, t3, y3 = h.view(3, 4, -1), t.view(3, 4, -1), y.view(3, 4)
    ref = kd_loss(h @ w.T, t, y, kind="reverse_kl", temperature=2.0)
    hh = h3.clone().requires_grad_()
    loss = fused_kd_loss(hh, w, y3, t3, kind="reverse_kl", temperature=2.0, chunk=5)  # weight frozen
    loss.backward()
    torch.testing.assert_close(loss.detach(), ref)
    hr = h.clone().requires_grad_()
    kd_loss(hr @ w.T, t, y, kind="reverse_kl", temperature=2.0).backward()
    torch.testing.assert_close(hh.grad.view(12, -1), hr.grad)
    with torch.no_grad():
        torch.testing.assert_close(fused_kd_loss(h, w, y, t, kind="reverse_kl", temperature=2.0), ref)
    ww = w.clone().requires_grad_()
    fused_kd_loss(h, ww, y, t, kind="reverse_kl", temperature=2.0).backward()  # hidden frozen
    wr = w.clone().requires_grad_()
    kd_loss(h @ wr.T, t, y, kind="reverse_kl", temperature=2.0).backward()
    torch.testing.assert_close(ww.grad, wr.grad)


def test_all_ignored_and_teacher_gets_no_grad():
    h, w, t, y = make()
    loss, gh, gw = run(lambda h, w: fused_kd_loss(h, w, torch.full_like(y, IGNORE), t), h, w)
    assert loss.item() == 0.0 and gh.abs().sum() == 0 and gw.abs().sum() == 0
    tt = t.clone().requires_grad_()
    base = TopKTeacher.from_logits(t, 4)
    sig = TopKTeacher(base.ids, base.values.clone().requires_grad_(), tail_mass=base.tail_mass.clone().requires_grad_())
    hh = h.clone().requires_grad_()
    (fused_kd_loss(hh, w, y, tt) + fused_kd_loss(hh, w, y, sig)).backward()
    assert tt.grad is None and sig.values.grad is None and sig.tail_mass.grad is None and hh.grad is not None


def test_terms_and_module():
    h, w, t, y = make()
    head = DistillationHead(kind="jsd", temperature=2.0, alpha=0.3, beta=0.6, chunk=6)
    terms = head(h, w, y, t, return_terms=True)
    ref = kd_loss(h @ w.T, t, y, kind="jsd", temperature=2.0, alpha=0.3, beta=0.6, return_terms=True)
    for name in ("total", "soft", "hard"):
        torch.testing.assert_close(getattr(terms, name), getattr(ref, name))
    assert terms.n_tokens == int((y != IGNORE).sum()) == ref.n_tokens
    assert "kind='jsd'" in repr(head) and list(head.parameters()) == []


def test_bf16_hidden_and_weight():
    h, w, t, y = make()
    hb, wb = h.bfloat16(), w.bfloat16()
    loss, gh, gw = run(lambda h, w: fused_kd_loss(h, w, y, t, kind="forward_kl", temperature=2.0, chunk=4), hb, wb)
    ref = run(lambda h, w: kd_loss(h @ w.T, t, y, kind="forward_kl", temperature=2.0), hb.float(), wb.float())
    assert gh.dtype == gw.dtype == torch.bfloat16
    torch.testing.assert_close(loss, ref[0], atol=2e-2, rtol=1e-2)
    torch.testing.assert_close(gh.float(), ref[1], atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(gw.float(), ref[2], atol=2e-2, rtol=2e-2)


def test_on_a_kdarch_student():
    torch.manual_seed(0)
    model = CausalLM(get_preset("debug"))
    V = model.config.vocab_size
    ids = torch.randint(0, V, (2, 9))
    teacher = 3 * torch.randn(2, 8, V)
    out = model(ids)
    h, labels = out.last_hidden_state[:, :-1], ids[:, 1:]
    params = [p for p in model.parameters() if p.requires_grad]
    fused = fused_kd_loss(h, model.head.weight, labels, teacher, temperature=2.0)
    g_fused = torch.autograd.grad(fused, params, retain_graph=True, allow_unused=True)
    ref = kd_loss(out.logits[:, :-1], teacher, labels, temperature=2.0)
    g_ref = torch.autograd.grad(ref, params, allow_unused=True)
    torch.testing.assert_close(fused, ref)
    assert sum(g is not None for g in g_fused) > 10
    for a, b in zip(g_fused, g_ref):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("signal", ["dense", "tail", "renormalise", "k=V"])
def test_entries_masked_on_both_sides_contribute_nothing(kind, signal):
    """A head weight whose masked rows give -inf logits (h[:, 0] = 1, row = [-inf, 0, ...]) and a teacher masked
    on the same entries: loss, dL/dh and dL/dW equal the fused loss on the vocabulary without them, dL/dW is 0 on
    the masked rows, nothing is NaN; the same through DistillationHead."""
    h, w, t, y = make(dtype=torch.float64, seed=3)
    masked = torch.tensor([1, 7, 30])
    keep = torch.tensor([v for v in range(w.shape[0]) if v not in masked.tolist()])
    h[:, 0] = 1.0
    w_m, t_m = w.clone(), t.clone()
    w_m[masked] = 0.0
    w_m[masked, 0] = float("-inf")
    t_m[:, masked] = float("-inf")
    assert torch.isneginf(h @ w_m.T)[:, masked].all()
    y = torch.where(torch.isin(y, masked), 0, y)
    remap = torch.full((w.shape[0],), -1, dtype=torch.long)
    remap[keep] = torch.arange(len(keep))
    y_k = torch.where(y == IGNORE, IGNORE, remap[y.clamp_min(0)])

    def teacher(logits):
        if signal == "dense":
            return logits
        k = logits.shape[-1] if signal == "k=V" else 5
        return TopKTeacher.from_logits(logits, k, mode="renormalise" if signal == "renormalise" else "tail")
    opts = dict(kind=kind, temperature=2.0, alpha=0.6, beta=0.3)
    got = run(lambda h, w: fused_kd_loss(h, w, y, teacher(t_m), chunk=4, **opts), h, w_m)
    want = run(lambda h, w: fused_kd_loss(h, w, y_k, teacher(t[:, keep]), chunk=4, **opts), h, w[keep])
    assert all(torch.isfinite(x).all() for x in got)
    assert_same(got[:2], want[:2])
    torch.testing.assert_close(got[2][keep], want[2])
    assert (got[2][masked] == 0).all()
    head = DistillationHead(chunk=3, **opts)
    assert_same(run(lambda h, w: head(h, w, y, teacher(t_m)), h, w_m)[:2], want[:2])


def test_bad_inputs():
    h, w, t, y = make()
    with pytest.raises(ValueError, match=r"^fused_kd_loss: hidden: expected a float tensor \[\.\.\., D\] with "
                                         r"D = 5 like weight \[V, D\] = \[31, 5\], got a float32 tensor of shape "
                                         r"\(19, 12\)$"):
        fused_kd_loss(h, w[:, :5], y, t)
    with pytest.raises(ValueError, match=r"^fused_kd_loss: weight: expected hidden's dtype \(torch.float32\), "
                                         r"got torch.float64$"):
        fused_kd_loss(h, w.double(), y, t)
    with pytest.raises(ValueError, match=r"^fused_kd_loss: hidden: expected a float tensor \[\.\.\., D\] with "
                                         r"D = 12 like weight \[V, D\] = \[31, 12\], got an int64 tensor of shape "
                                         r"\(19, 12\)$"):
        fused_kd_loss(h.long(), w, y, t)
    with pytest.raises(ValueError, match=r"^fused_kd_loss: weight: expected a float tensor \[V, D\], got a float32 "
                                         r"tensor of shape \(31,\)$"):
        fused_kd_loss(h, w[:, 0], y, t)
    with pytest.raises(ValueError, match=r"^fused_kd_loss: chunk: expected an int >= 1 or None, got -1$"):
        fused_kd_loss(h, w, y, t, chunk=-1)
    with pytest.raises(ValueError, match=r"^fused_kd_loss: teacher: expected logits over the student's vocabulary, "
                                         r"V=31 \(vocab size mismatch.*, got a float32 tensor of shape \(19, 40\)$"):
        fused_kd_loss(h, w, y, F.pad(t, (0, 9)))
    with pytest.raises(ValueError, match=r"^fused_kd_loss: labels: expected an int64/int32 tensor of shape \(19,\), "
                                         r"got an int64 tensor of shape \(5,\)$"):
        fused_kd_loss(h, w, y[:5], t)
    with pytest.raises(ValueError, match=r"^KDLossConfig.kind: expected one of 'forward_kl', 'reverse_kl', 'jsd', "
                                         r"'tvd', got 'kl_div'$"):
        DistillationHead(kind="kl_div")
