"""kd_loss and the top-k teacher signal against plain-PyTorch formulas written out here (autograd for the
gradients), plus finite-difference gradchecks, masking, limits and input validation."""
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from kdarch.checks import set_value_checks
from kdarch.distill import KINDS, KDLossConfig, TopKTeacher, kd_loss

IGNORE = -100


# ------------------------------------------------------------------ independent references (no kdarch code)
def ref_divergence(ls, lt, kind, beta=0.5):
    """Per-row divergence between distributions given as log-probs (teacher lt, student ls)."""
    ps, pt = ls.exp(), lt.exp()
    if kind == "forward_kl" or (kind == "jsd" and beta == 0):
        return (pt * (lt - ls)).sum(-1)
    if kind == "reverse_kl" or (kind == "jsd" and beta == 1):
        return (ps * (ls - lt)).sum(-1)
    if kind == "jsd":
        lm = (beta * pt + (1 - beta) * ps).log()
        return beta * (pt * (lt - lm)).sum(-1) + (1 - beta) * (ps * (ls - lm)).sum(-1)
    return 0.5 * (pt - ps).abs().sum(-1)


def ref_loss(s, y, kind, T, alpha, beta=0.5, teacher_lt=None, student_ls=None):
    """alpha * scale * mean soft + (1 - alpha) * CE over rows with y != IGNORE; the soft term uses the given
    bucket log-probs (default: dense softmax at T of s and of the teacher logits)."""
    valid = y != IGNORE
    if not valid.any():
        return s.sum() * 0
    scale = 1.0 if kind == "tvd" else T * T
    soft = scale * ref_divergence(student_ls[valid], teacher_lt[valid], kind, beta).mean()
    return alpha * soft + (1 - alpha) * F.cross_entropy(s[valid], y[valid])


def dense_ref(s, t, y, kind, T, alpha, beta=0.5):
    return ref_loss(s, y, kind, T, alpha, beta, F.log_softmax(t / T, -1), F.log_softmax(s / T, -1))


def renorm_ref(s, ids, vals, y, kind, T, alpha, beta=0.5):
    lt = F.log_softmax(vals / T, -1)
    ls = F.log_softmax(s.gather(-1, ids) / T, -1)
    return ref_loss(s, y, kind, T, alpha, beta, lt, ls)


def tail_ref(s, ids, logp, tail, y, kind, T, alpha, beta=0.5):
    q = torch.cat([logp.exp(), tail[..., None]], -1) ** (1 / T)  # buckets re-tempered
    lt = (q / q.sum(-1, keepdim=True)).log()
    p = F.softmax(s / T, -1).gather(-1, ids)
    ls = torch.cat([p, 1 - p.sum(-1, keepdim=True)], -1).log()
    return ref_loss(s, y, kind, T, alpha, beta, lt, ls)


def make(shape=(2, 7), V=29, dtype=torch.float32, seed=0, ignore_every=3):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(*shape, V, generator=g, dtype=dtype)
    t = 2 * torch.randn(*shape, V, generator=g, dtype=dtype)
    y = torch.randint(0, V, shape, generator=g)
    y.view(-1)[::ignore_every] = IGNORE
    return s, t, y


def loss_and_grad(fn, s):
    s = s.detach().clone().requires_grad_()
    loss = fn(s)
    (3.0 * loss).backward()  # a non-unit upstream gradient
    return loss.detach(), s.grad


# ------------------------------------------------------------------------------------------- dense
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("T", [1.0, 2.5])
@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_dense_matches_reference(kind, T, alpha):
    s, t, y = make()
    t.requires_grad_()
    loss, g = loss_and_grad(lambda x: kd_loss(x, t, y, kind=kind, temperature=T, alpha=alpha, beta=0.3, chunk=4), s)
    ref, g_ref = loss_and_grad(lambda x: dense_ref(x, t.detach(), y, kind, T, alpha, 0.3), s)
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(g, g_ref)
    assert t.grad is None  # no gradient ever reaches the teacher
    assert g.view(-1, s.shape[-1])[0].abs().sum() == 0  # row 0 is ignored


@pytest.mark.parametrize("kind", KINDS)
def test_gradcheck_float64(kind):
    s, t, y = make((5,), V=7, dtype=torch.float64, seed=1, ignore_every=4)
    s.requires_grad_()
    assert torch.autograd.gradcheck(lambda x: kd_loss(x, t, y, kind=kind, temperature=1.7, alpha=0.6, beta=0.3,
                                                      chunk=2), (s,))


def test_jsd_ends_are_the_kls_and_its_limits():
    s, t, y = make(dtype=torch.float64)
    for beta, kind in ((0.0, "forward_kl"), (1.0, "reverse_kl")):
        got = kd_loss(s, t, y, kind="jsd", beta=beta, temperature=2.0, alpha=1.0)
        torch.testing.assert_close(got, dense_ref(s, t, y, kind, 2.0, 1.0))
    # inside (0, 1) JSD_beta -> 0 at the ends, as beta * KL(t||s) and (1 - beta) * KL(s||t)
    fwd = kd_loss(s, t, y, kind="forward_kl", temperature=2.0, alpha=1.0)
    rev = kd_loss(s, t, y, kind="reverse_kl", temperature=2.0, alpha=1.0)
    eps = 1e-6
    torch.testing.assert_close(kd_loss(s, t, y, kind="jsd", beta=eps, temperature=2.0, alpha=1.0) / eps, fwd,
                               rtol=1e-4, atol=0)
    torch.testing.assert_close(kd_loss(s, t, y, kind="jsd", beta=1 - eps, temperature=2.0, alpha=1.0) / eps, rev,
                               rtol=1e-4, atol=0)


def test_soft_scale_and_terms():
    s, t, y = make()
    n = int((y != IGNORE).sum())
    terms = kd_loss(s, t, y, kind="forward_kl", temperature=3.0, alpha=0.25, return_terms=True)
    kl = dense_ref(s, t, y, "forward_kl", 3.0, 1.0)  # already × T²
    ce = dense_ref(s, t, y, "forward_kl", 3.0, 0.0)
    torch.testing.assert_close(terms.soft, kl)
    torch.testing.assert_close(terms.hard, ce)
    torch.testing.assert_close(terms.total, 0.25 * kl + 0.75 * ce)
    assert terms.n_tokens == n and not terms.soft.requires_grad
    # TVD is not scaled by T²: same value at every T when the logits are scaled along
    tvd1 = kd_loss(s, t, y, kind="tvd", temperature=1.0, alpha=1.0)
    torch.testing.assert_close(kd_loss(3 * s, 3 * t, y, kind="tvd", temperature=3.0, alpha=1.0), tvd1)


def test_all_ignored_is_zero_and_masked_rows_never_leak():
    s, t, y = make()
    loss, g = loss_and_grad(lambda x: kd_loss(x, t, torch.full_like(y, IGNORE)), s)
    assert loss.item() == 0.0 and g.abs().sum() == 0
    t_bad, s_bad = t.clone(), s.clone()
    t_bad[y == IGNORE] = float("nan")
    s_bad[y == IGNORE] = float("inf")
    loss, g = loss_and_grad(lambda x: kd_loss(x, t_bad, y, kind="jsd", temperature=2.0), s_bad)
    ref, g_ref = loss_and_grad(lambda x: dense_ref(x, t, y, "jsd", 2.0, 0.5), s)
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(g[y != IGNORE], g_ref[y != IGNORE])


def test_custom_ignore_index_and_no_labels():
    s, t, y = make()
    y0 = y.clamp_min(0)  # ignore_index=0: rows labelled 0 count in neither term
    want = dense_ref(s, t, torch.where(y0 == 0, IGNORE, y0), "reverse_kl", 2.0, 0.5)
    torch.testing.assert_close(kd_loss(s, t, y0, kind="reverse_kl", temperature=2.0, ignore_index=0), want)
    torch.testing.assert_close(kd_loss(s, t, None, temperature=2.0, alpha=1.0),
                               dense_ref(s, t, torch.zeros_like(y), "forward_kl", 2.0, 1.0))


def test_teacher_minus_inf_logits_give_zero_probability():
    s, t, y = make()
    t[..., -3:] = float("-inf")  # e.g. padded vocabulary entries masked by the teacher
    valid = y != IGNORE
    lt = F.log_softmax(t / 2.0, -1)

    def ref(x):
        ls = F.log_softmax(x / 2.0, -1)
        kl = torch.where(lt.exp() > 0, lt.exp() * (lt - ls), 0).sum(-1)  # 0 log 0 = 0
        return 0.5 * 4 * kl[valid].mean() + 0.5 * F.cross_entropy(x[valid], y[valid])
    loss, g = loss_and_grad(lambda x: kd_loss(x, t, y, kind="forward_kl", temperature=2.0), s)
    want, g_want = loss_and_grad(ref, s)
    torch.testing.assert_close(loss, want)
    torch.testing.assert_close(g, g_want)


def test_bf16_student_logits():
    s, t, y = make()
    sb = s.bfloat16()
    loss, g = loss_and_grad(lambda x: kd_loss(x, t, y, kind="jsd", temperature=2.0), sb)
    ref, g_ref = loss_and_grad(lambda x: dense_ref(x, t, y, "jsd", 2.0, 0.5), sb.float())
    assert loss.dtype == torch.float32 and g.dtype == torch.bfloat16
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(g.float(), g_ref, atol=1e-3, rtol=1e-2)


# ------------------------------------------------------------------------------------------- top-k
@pytest.mark.parametrize("mode", ["tail", "renormalise"])
@pytest.mark.parametrize("kind", KINDS)
def test_topk_with_k_equal_v_is_the_dense_loss(mode, kind):
    s, t, y = make()
    V = s.shape[-1]
    dense, g_dense = loss_and_grad(lambda x: kd_loss(x, t, y, kind=kind, temperature=2.0, chunk=5), s)
    perm = torch.randperm(V, generator=torch.Generator().manual_seed(3)).expand(*t.shape[:-1], V)
    logp = F.log_softmax(t, -1)
    signals = [TopKTeacher(perm, logp.gather(-1, perm), "logprobs", mode=mode),
               TopKTeacher(perm, t.gather(-1, perm), "logits", torch.zeros(t.shape[:-1]), mode=mode),
               TopKTeacher.from_logits(t, V, mode=mode)]
    for sig in signals:
        loss, g = loss_and_grad(lambda x, sig=sig: kd_loss(x, sig, y, kind=kind, temperature=2.0, chunk=5), s)
        torch.testing.assert_close(loss, dense)
        torch.testing.assert_close(g, g_dense)


@pytest.mark.parametrize("chunk_elements", [1, 3 * 40, 1 << 24])
def test_topk_from_logits_chunk_by_chunk_matches_the_whole_log_softmax(chunk_elements):
    """Chunks of 1 row, of 3 rows (the last one short) and all rows give the fp64 log-softmax's top-k and tail;
    masked -inf entries stay out of both."""
    t = torch.randn(2, 7, 40, generator=torch.Generator().manual_seed(3)) * 4
    t[..., -5:] = float("-inf")
    sig = TopKTeacher.from_logits(t, 6, chunk_elements=chunk_elements)
    logp = t.double().log_softmax(-1)
    values, ids = logp.topk(6, -1)
    assert sig.ids.shape == (2, 7, 6) and sig.tail_mass.shape == (2, 7)
    torch.testing.assert_close(sig.ids, ids, rtol=0, atol=0)
    torch.testing.assert_close(sig.values.double(), values, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(sig.tail_mass.double(), 1 - values.exp().sum(-1), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("T", [1.0, 0.7])
def test_topk_modes_match_reference(kind, T):
    s, t, y = make(dtype=torch.float64, seed=4)
    sig = TopKTeacher.from_logits(t, 6, mode="tail")
    assert sig.values.dtype == torch.float32
    ids, logp, tail = sig.ids, sig.values.double(), sig.tail_mass.double()
    torch.testing.assert_close(tail, 1 - logp.exp().sum(-1))
    sig = TopKTeacher(ids, logp, "logprobs", tail, mode="tail")
    loss, g = loss_and_grad(lambda x: kd_loss(x, sig, y, kind=kind, temperature=T, beta=0.4, chunk=3), s)
    ref, g_ref = loss_and_grad(lambda x: tail_ref(x, ids, logp, tail, y, kind, T, 0.5, 0.4), s)
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(g, g_ref)
    # without tail_mass it is derived from the log-probs; logits + tail_mass give the same buckets
    no_tail = TopKTeacher(ids, logp, "logprobs", mode="tail")
    torch.testing.assert_close(kd_loss(s, no_tail, y, kind=kind, temperature=T, beta=0.4), ref)
    shifted = TopKTeacher(ids, logp + 5.0, "logits", tail, mode="tail")
    torch.testing.assert_close(kd_loss(s, shifted, y, kind=kind, temperature=T, beta=0.4), ref)

    sig = TopKTeacher(ids, logp + 5.0, "logits", mode="renormalise")
    loss, g = loss_and_grad(lambda x: kd_loss(x, sig, y, kind=kind, temperature=T, beta=0.4, chunk=3), s)
    ref, g_ref = loss_and_grad(lambda x: renorm_ref(x, ids, logp, y, kind, T, 0.5, 0.4), s)
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(g, g_ref)


@pytest.mark.parametrize("mode", ["tail", "renormalise"])
def test_topk_gradcheck_and_zero_tail(mode):
    s, t, y = make((4,), V=9, dtype=torch.float64, seed=5, ignore_every=3)
    sig = TopKTeacher.from_logits(t, 3, mode=mode)
    s.requires_grad_()
    assert torch.autograd.gradcheck(lambda x: kd_loss(x, sig, y, kind="jsd", temperature=1.5, chunk=2), (s,))
    zero = TopKTeacher(sig.ids, sig.values.double().log_softmax(-1), "logprobs", torch.zeros(4), mode=mode)
    for kind in KINDS:  # a teacher tail of exactly 0 stays finite
        assert torch.isfinite(kd_loss(s, zero, y, kind=kind, temperature=2.0))


# ------------------------------------------------------------------------------------------ bad input
def test_config_errors_name_the_allowed_values():
    s, t, y = make()
    with pytest.raises(ValueError, match=r"^KDLossConfig.kind: expected one of 'forward_kl', 'reverse_kl', 'jsd', "
                                         r"'tvd', got 'kl'$"):
        kd_loss(s, t, y, kind="kl")
    for kw, msg in ((dict(temperature=0.0), r"KDLossConfig.temperature: expected a finite number > 0, got 0.0"),
                    (dict(temperature=math.inf), r"KDLossConfig.temperature: expected a finite number > 0, got inf"),
                    (dict(temperature=True), r"KDLossConfig.temperature: expected a finite number > 0, got True"),
                    (dict(alpha=1.5), r"KDLossConfig.alpha: expected a finite number in \[0, 1\], got 1.5"),
                    (dict(beta=-0.1), r"KDLossConfig.beta: expected a finite number in \[0, 1\], got -0.1"),
                    (dict(chunk=0), r"kd_loss: chunk: expected an int >= 1 or None, got 0"),
                    (dict(chunk=2.0), r"kd_loss: chunk: expected an int >= 1 or None, got 2.0")):
        with pytest.raises(ValueError, match="^" + msg + "$"):
            kd_loss(s, t, y, **kw)
    with pytest.raises(ValueError, match=r"^KDLossConfig.ignore_index: expected an int, got 1.5$"):
        KDLossConfig(ignore_index=1.5)


def test_input_errors():
    s, t, y = make()
    V = s.shape[-1]
    with pytest.raises(ValueError, match=r"^kd_loss: teacher: expected logits over the student's vocabulary, V=29 "
                                         r"\(vocab size mismatch.*teacher_logits\[\.\.\., :29\]\), got a float32 "
                                         r"tensor of shape \(2, 7, 32\)$"):
        kd_loss(s, F.pad(t, (0, 3)), y)
    with pytest.raises(ValueError, match=r"^kd_loss: teacher: expected logits of shape \(2, 7, 29\) like the "
                                         r"student's, got a float32 tensor of shape \(1, 7, 29\)$"):
        kd_loss(s, t[:1], y)
    with pytest.raises(ValueError, match=r"^kd_loss: teacher: expected float logits \[\.\.\., V\] or a TopKTeacher, "
                                         r"got an int64 tensor of shape \(2, 7, 29\)$"):
        kd_loss(s, t.long(), y)
    with pytest.raises(TypeError, match=r"^kd_loss: teacher: expected a logits tensor \[\.\.\., V\] or a "
                                        r"TopKTeacher, got \[\["):
        kd_loss(s, t.tolist(), y)
    with pytest.raises(ValueError, match=r"^kd_loss: student_logits: expected a float tensor \[\.\.\., V\] with "
                                         r"V >= 1, got an int64 tensor of shape \(2, 7, 29\)$"):
        kd_loss(s.long(), t, y)
    with pytest.raises(ValueError, match=r"^kd_loss: labels: expected an int64/int32 tensor of shape \(2, 7\), got an "
                                         r"int64 tensor of shape \(2, 3\)$"):
        kd_loss(s, t, y[:, :3])
    with pytest.raises(ValueError, match=r"^kd_loss: labels: expected an int64/int32 tensor of shape \(2, 7\), got a "
                                         r"float32 tensor of shape \(2, 7\)$"):
        kd_loss(s, t, y.float())
    bad = y.clone()
    bad[0, 1] = V
    with pytest.raises(ValueError, match=r"^kd_loss: labels: expected token ids in \[0, 29\) \(or -100 to ignore\), "
                                         r"got 29$"):
        kd_loss(s, t, bad)
    with pytest.raises(ValueError, match=r"^kd_loss: labels: expected a labels tensor \(the hard-label term, "
                                         r"alpha=0.5 < 1, needs labels; or pass alpha=1\), got None$"):
        kd_loss(s, t, None, alpha=0.5)


def test_topk_errors():
    s, t, y = make()
    sig = TopKTeacher.from_logits(t, 4)
    with pytest.raises(ValueError, match=r"^kd_loss: TopKTeacher.ids: expected ids of the student's vocabulary "
                                         r"\(teacher and student vocabularies must match\) in \[0, 20\), got 2\d$"):
        kd_loss(s[..., :20], sig, y.clamp_max(19))
    dup = sig.ids.clone()
    dup[..., 1] = dup[..., 0]
    with pytest.raises(ValueError, match=r"^kd_loss: TopKTeacher.ids: expected distinct ids within each row, "
                                         r"got \[(\d+), \1, \d+, \d+\]$"):
        kd_loss(s, TopKTeacher(dup, sig.values), y)
    with pytest.raises(ValueError, match=r"^kd_loss: TopKTeacher.values: expected log-probs \(values_are='logprobs'\) "
                                         r"whose exp sums to <= 1 in every row; pass logits with values_are='logits', "
                                         r"got 'a row whose exp sums to \d+(\.\d+)?'$"):
        kd_loss(s, TopKTeacher(sig.ids, sig.values + 3.0), y)
    with pytest.raises(ValueError, match=r"^kd_loss: TopKTeacher.k: expected an int <= the student's vocab size V=3, "
                                         r"got 4$"):
        kd_loss(s[..., :3], sig, y.clamp_max(2))
    with pytest.raises(ValueError, match=r"^kd_loss: TopKTeacher.ids: expected a tensor of shape \(14,\) \+ \(K,\), "
                                         r"one row per student row, got an int64 tensor of shape \(2, 7, 4\)$"):
        kd_loss(s.reshape(14, -1), sig, y.reshape(-1))
    with pytest.raises(ValueError, match=r'^TopKTeacher.tail_mass: expected a tensor for mode="tail" with '
                                         r'values_are="logits" \(or log-probs as values, or mode="renormalise"\), '
                                         r'got None$'):
        TopKTeacher(sig.ids, sig.values, "logits")
    with pytest.raises(ValueError, match=r"^TopKTeacher.mode: expected one of 'tail', 'renormalise', got 'renorm'$"):
        TopKTeacher(sig.ids, sig.values, mode="renorm")
    with pytest.raises(ValueError, match=r"^TopKTeacher.values: expected a float tensor shaped like ids \(2, 7, 4\), "
                                         r"got a float32 tensor of shape \(2, 7, 2\)$"):
        TopKTeacher(sig.ids, sig.values[..., :2])
    with pytest.raises(ValueError, match=r"^TopKTeacher.ids: expected an int64/int32 tensor \[\.\.\., K\] with "
                                         r"K >= 1, got a float32 tensor of shape \(2, 7, 4\)$"):
        TopKTeacher(sig.values, sig.values)
    with pytest.raises(ValueError, match=r"^kd_loss: TopKTeacher.tail_mass: expected values in \[0, 1\], got 2\.\d+$"):
        kd_loss(s, TopKTeacher(sig.ids, sig.values, tail_mass=sig.tail_mass + 2), y)


def test_value_checks_only_where_switched_on():
    """Label ranges and the top-k signal's ids / mass are value checks (a host sync): skipped when switched off
    (`kdarch.checks.set_value_checks(False)`, as KDARCH_CHECKS=0 does), while shape checks stay on."""
    s, t, y = make()
    sig = TopKTeacher.from_logits(t, 4)
    dup = sig.ids.clone()
    dup[..., 1] = dup[..., 0]
    bad = y.clone()
    bad[0, 1] = 10**6  # never gathered below: alpha=1 computes no hard term
    try:
        set_value_checks(False)
        kd_loss(s, TopKTeacher(dup, sig.values), y)
        kd_loss(s, TopKTeacher(sig.ids, sig.values + 3.0, tail_mass=sig.tail_mass + 2), y)
        kd_loss(s, t, bad, alpha=1.0)
        with pytest.raises(ValueError, match=r"^kd_loss: labels: expected an int64/int32 tensor of shape \(2, 7\)"):
            kd_loss(s, t, y[:, :3])
        set_value_checks(True)
        with pytest.raises(ValueError, match=r"labels: expected token ids in \[0, 29\)"):
            kd_loss(s, t, bad, alpha=1.0)
    finally:
        set_value_checks(None)


# ---------------------------------------------------------------------------------------------- masked vocabulary
def masked_pair(dtype, V=12, masked=(2, 9, 10), seed=7):
    """Student and teacher logits [6, V] (student in `dtype`, teacher fp64 or fp32) masked with -inf on the same
    columns, the same logits with those columns dropped, labels (one row ignored) and their remap."""
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(6, V, generator=g, dtype=torch.float64).to(dtype)
    t = torch.randn(6, V, generator=g, dtype=torch.float64).to(torch.float64 if dtype == torch.float64 else
                                                                 torch.float32)
    masked = torch.tensor(masked)
    keep = torch.tensor([i for i in range(V) if i not in masked.tolist()])
    s_m, t_m = s.clone(), t.clone()
    s_m[:, masked], t_m[:, masked] = float("-inf"), float("-inf")
    labels = torch.tensor([0, 1, IGNORE, 4, 5, 11])
    remap = torch.full((V,), IGNORE, dtype=torch.long)
    remap[keep] = torch.arange(len(keep))
    labels_k = torch.where(labels == IGNORE, IGNORE, remap[labels.clamp_min(0)])
    return s_m, t_m, s[:, keep], t[:, keep], labels, labels_k, masked, keep


def topk_signal(logits, signal):
    """The teacher as `signal`: dense logits, or its top-4 ("tail" / "renormalise"), or all of it as a top-k."""
    if signal == "dense":
        return logits
    if signal == "k=V":  # includes the masked entries (log-prob -inf) when there are any
        return TopKTeacher.from_logits(logits, logits.shape[-1])
    return dataclasses.replace(TopKTeacher.from_logits(logits, 4), mode=signal)  # masked entries never lead


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("signal", ["dense", "tail", "renormalise", "k=V"])
@pytest.mark.parametrize("T", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_entries_masked_on_both_sides_contribute_nothing(kind, signal, T, dtype):
    """A padded vocabulary masked with -inf in student and teacher alike: the loss and its gradients equal those
    on the vocabulary with the masked columns dropped (0 · log 0 = 0, never NaN), and the masked columns get
    gradient 0. T = 1 with a dense teacher takes the hard CE from the soft term's softmax; chunk=2 with an
    ignored row reads rows by index."""
    s_m, t_m, s_k, t_k, y, y_k, masked, keep = masked_pair(dtype)
    opts = dict(kind=kind, temperature=T, alpha=0.7, beta=0.3, chunk=2)
    a, b = s_m.clone().requires_grad_(), s_k.clone().requires_grad_()
    got = kd_loss(a, topk_signal(t_m, signal), y, **opts)
    want = kd_loss(b, topk_signal(t_k, signal), y_k, **opts)
    assert torch.isfinite(got)
    torch.testing.assert_close(got, want)
    (3.0 * got).backward()
    (3.0 * want).backward()
    assert torch.isfinite(a.grad).all()
    torch.testing.assert_close(a.grad[:, keep], b.grad)
    assert (a.grad[:, masked] == 0).all()


@pytest.mark.parametrize("kind", KINDS)
def test_masked_entries_match_the_reference_on_the_kept_vocabulary(kind):
    """The same, against the plain formulas of this file on the kept columns (not kdarch on them)."""
    s_m, t_m, s_k, t_k, y, y_k, masked, keep = masked_pair(torch.float64)
    loss, g = loss_and_grad(lambda x: kd_loss(x, t_m, y, kind=kind, temperature=2.0, beta=0.3), s_m)
    ref, g_ref = loss_and_grad(lambda x: dense_ref(x, t_k, y_k, kind, 2.0, 0.5, 0.3), s_k)
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(g[:, keep], g_ref)
    assert (g[:, masked] == 0).all()


def test_one_sided_mask_is_not_hidden():
    """Only entries masked on both sides are exempt. A student -inf where the teacher has mass makes forward KL
    explode (it is infinite) while reverse KL and JSD, which weigh it by the student's 0, stay exact; a teacher
    -inf where the student has mass does the same the other way round."""
    s, t, y = make(dtype=torch.float64)
    valid = y != IGNORE
    s_m, t_m = s.clone(), t.clone()
    s_m[..., 3] = float("-inf")
    t_m[..., 5] = float("-inf")
    opts = dict(temperature=1.0, alpha=1.0)
    assert kd_loss(s_m, t, y, kind="forward_kl", **opts) > 1e30
    assert kd_loss(s, t_m, y, kind="reverse_kl", **opts) > 1e30

    def xlogy_ref(ls, lt, kind, beta=0.5):  # Σ p log(p / q) with 0 log 0 = 0, written with where
        ps, pt = ls.exp(), lt.exp()
        kl = lambda p, lp, lq: torch.where(p > 0, p * (lp - lq), 0).sum(-1)  # noqa: E731
        if kind == "reverse_kl":
            return kl(ps, ls, lt)
        if kind == "forward_kl":
            return kl(pt, lt, ls)
        lm = (beta * pt + (1 - beta) * ps).log()
        return beta * kl(pt, lt, lm) + (1 - beta) * kl(ps, ls, lm)
    for kind, ls, lt, s_in, t_in in (("reverse_kl", s_m, t, s_m, t), ("jsd", s_m, t, s_m, t),
                                      ("forward_kl", s, t_m, s, t_m), ("jsd", s, t_m, s, t_m)):
        want = xlogy_ref(F.log_softmax(ls, -1), F.log_softmax(lt, -1), kind)[valid].mean()
        torch.testing.assert_close(kd_loss(s_in, t_in, y, kind=kind, **opts), want)
    # the exact gradient of reverse KL with the student's masked entry: its kept entries, the teacher's full softmax
    keep = torch.tensor([i for i in range(s.shape[-1]) if i != 3])

    def rev_kept(x):
        ls = F.log_softmax(x, -1)
        lt = F.log_softmax(t, -1)[..., keep]
        return (ls.exp() * (ls - lt)).sum(-1)[valid].mean()
    loss, g = loss_and_grad(lambda x: kd_loss(x, t, y, kind="reverse_kl", **opts), s_m)
    ref, g_ref = loss_and_grad(rev_kept, s[..., keep])
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(g[..., keep], g_ref)
    assert (g[..., 3] == 0).all()
