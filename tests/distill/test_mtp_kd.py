"""MTP-aware KD equals the materialised computation (head logits of each depth against the teacher rows of
the tokens it predicts), in value and gradients, for dense and top-k teachers; the alignment is checked with
an oracle student that only scores zero when every depth is matched to the right teacher row and label; with
α = 0 it reproduces the model's own lm_loss + λ·mtp_loss."""
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from kdarch import CausalLM, get_preset
from kdarch.distill import TopKTeacher, kd_loss
from kdarch.distill.mtp import multi_token_kd_loss

IGNORE = -100


@pytest.fixture(scope="module")
def student():
    """A debug student with two MTP depths, its hidden states (as leaves) and its own losses on ids."""
    torch.manual_seed(0)
    cfg = dataclasses.replace(get_preset("debug"), n_mtp_modules=2)
    model = CausalLM(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model(ids, labels=ids, output_mtp_hidden_states=True, return_logits=False)
    teacher = 2 * torch.randn(2, 9, cfg.vocab_size, generator=torch.Generator().manual_seed(2))
    return dict(cfg=cfg, model=model, ids=ids, out=out, teacher=teacher, hs=out.last_hidden_state,
                mtp=list(out.mtp_hidden_states), w=model.head.weight.detach())


def topk_rows(tk: TopKTeacher, a: int, b: int) -> TopKTeacher:
    """Positions a..b-1 of a [B, T, K] top-k teacher."""
    tail = tk.tail_mass[:, a:b] if tk.tail_mass is not None else None
    return dataclasses.replace(tk, ids=tk.ids[:, a:b], values=tk.values[:, a:b], tail_mass=tail)


def rows(teacher, a: int, b: int):
    return topk_rows(teacher, a, b) if isinstance(teacher, TopKTeacher) else teacher[:, a:b]


def materialised(loss_fn, hs, mtp, w, labels, teacher, weights, lam):
    """(total, main, [depth losses]) from full logits: depth k row i predicts token i+k+1 with teacher row i+k."""
    T = hs.shape[1]
    cut = 1 if labels is not None else 0  # with labels the last row of every head has no target
    main = loss_fn(hs[:, :T - cut] @ w.T, rows(teacher, 0, T - cut), None if labels is None else labels[:, 1:])
    depths = [loss_fn(h[:, :T - k - cut] @ w.T, rows(teacher, k, T - cut),
                      None if labels is None else labels[:, k + 1:]) for k, h in enumerate(mtp, start=1)]
    mtp_loss = sum(wk * d for wk, d in zip(weights, depths)) / sum(weights)
    return main + lam * mtp_loss, main, depths


def plain_loss(s_NV, teacher, y_N, T, alpha):
    """Independent formula: α·T²·mean KL(p_t ‖ p_s) + (1 − α)·mean CE for dense and top-k ("tail" /
    "renormalise") teachers, over rows whose label is not IGNORE."""
    s_NV = s_NV.reshape(-1, s_NV.shape[-1])
    keep = torch.ones(s_NV.shape[0], dtype=torch.bool) if y_N is None else y_N.reshape(-1) != IGNORE
    s_NV = s_NV[keep]
    ls = F.log_softmax(s_NV / T, -1)
    if isinstance(teacher, TopKTeacher):
        ids, v = teacher.ids.reshape(-1, teacher.k)[keep], teacher.values.reshape(-1, teacher.k)[keep].to(s_NV.dtype)
        if teacher.mode == "renormalise":
            lt, ls = F.log_softmax(v / T, -1), F.log_softmax(s_NV.gather(1, ids) / T, -1)
        else:
            tail = teacher.tail_mass.reshape(-1)[keep].to(s_NV.dtype)
            lt = F.log_softmax(torch.cat([v, tail.log()[:, None]], 1) / T, -1)
            rest = ls.scatter(1, ids, float("-inf")).logsumexp(-1, keepdim=True)
            ls = torch.cat([ls.gather(1, ids), rest], 1)
    else:
        lt = F.log_softmax(teacher.reshape(-1, teacher.shape[-1])[keep].to(s_NV.dtype) / T, -1)
    soft = T ** 2 * (lt.exp() * (lt - ls)).sum(-1).mean()
    if y_N is None:
        return soft
    return alpha * soft + (1 - alpha) * F.cross_entropy(s_NV, y_N.reshape(-1)[keep])


def grads(fn, tensors):
    """fn's value and gradients w.r.t. fresh leaf copies of tensors, under a non-unit upstream gradient."""
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    res = fn(*leaves)
    total = res[0] if isinstance(res, tuple) else res.total
    (1.5 * total).backward()
    return res, [t.grad for t in leaves]


def labels_with_ignored(ids):
    y = ids.clone()
    y[0, 3] = IGNORE  # token 3 of row 0: no head predicts it
    y[1, -1] = IGNORE
    return y


def make_teacher(dense, signal):
    if signal == "dense":
        return dense
    return TopKTeacher.from_logits(dense, 7, mode=signal)


@pytest.mark.parametrize("kind,signal", [("forward_kl", "dense"), ("reverse_kl", "tail"), ("jsd", "renormalise"),
                                         ("tvd", "dense")])
def test_matches_materialised(student, kind, signal):
    s = student
    teacher, y = make_teacher(s["teacher"], signal), labels_with_ignored(s["ids"])
    opts = dict(kind=kind, temperature=2.0, alpha=0.3, beta=0.4)
    weights, lam = (0.7, 0.2), 0.5

    def fused(hs, m1, m2, w):
        return multi_token_kd_loss(hs, [m1, m2], w, y, teacher, depth_weights=weights, mtp_weight=lam, chunk=5,
                                   **opts)

    def naive(hs, m1, m2, w):
        return materialised(lambda s_, t_, y_: kd_loss(s_, t_, y_, **opts), hs, [m1, m2], w, y, teacher, weights, lam)

    args = [s["hs"], *s["mtp"], s["w"]]
    (res, g_fused), ((total, main, depths), g_naive) = grads(fused, args), grads(naive, args)
    torch.testing.assert_close(res.total, total.detach())
    torch.testing.assert_close(res.main.total, main.detach())
    for d_res, d_ref in zip(res.depths, depths, strict=True):
        torch.testing.assert_close(d_res.total, d_ref.detach())
    for a, b in zip(g_fused, g_naive, strict=True):
        torch.testing.assert_close(a, b)
    # label of row j is ids[j+1]: 16 main rows less the two ignored targets; depth k loses k rows per sequence
    assert [res.main.n_tokens] + [d.n_tokens for d in res.depths] == [14, 12, 10]


@pytest.mark.parametrize("signal", ["dense", "tail", "renormalise"])
def test_matches_plain_formula_fp64(student, signal):
    """Against the independent formula, in fp64, with a non-default ignore_index and equal depth weights."""
    s = student
    teacher = make_teacher(s["teacher"].double(), signal)
    y = labels_with_ignored(s["ids"]).masked_fill(labels_with_ignored(s["ids"]) == IGNORE, -1)
    T, alpha, lam = 1.5, 0.6, 0.3

    def fused(hs, m1, m2, w):
        return multi_token_kd_loss(hs, [m1, m2], w, y, teacher, mtp_weight=lam, temperature=T, alpha=alpha,
                                   ignore_index=-1, chunk=4)

    def naive(hs, m1, m2, w):
        fn = (lambda s_, t_, y_: plain_loss(s_, t_, y_.masked_fill(y_ == -1, IGNORE), T, alpha))
        return materialised(fn, hs, [m1, m2], w, y, teacher, (1.0, 1.0), lam)

    args = [t.double() for t in (s["hs"], *s["mtp"], s["w"])]
    (res, g_fused), ((total, _, depths), g_naive) = grads(fused, args), grads(naive, args)
    torch.testing.assert_close(res.total, total.detach())
    torch.testing.assert_close(res.mtp, (sum(depths) / 2).detach())
    for a, b in zip(g_fused, g_naive, strict=True):
        torch.testing.assert_close(a, b)
    assert res.main.soft is not None and res.main.hard is not None  # terms for logging / KDSchedule.observe


@pytest.mark.parametrize("signal", ["dense", "tail"])
def test_without_labels_every_teacher_row_counts(student, signal):
    s = student
    teacher, T = make_teacher(s["teacher"], signal), 2.0

    def fused(hs, m1, m2, w):
        return multi_token_kd_loss(hs, [m1, m2], w, None, teacher, temperature=T, alpha=1.0, chunk=6)

    def naive(hs, m1, m2, w):
        return materialised(lambda s_, t_, y_: plain_loss(s_, t_, y_, T, 1.0), hs, [m1, m2], w, None, teacher,
                            (1.0, 1.0), 0.3)

    args = [s["hs"], *s["mtp"], s["w"]]
    (res, g_fused), ((total, main, _), g_naive) = grads(fused, args), grads(naive, args)
    torch.testing.assert_close(res.total, total.detach())
    torch.testing.assert_close(res.main.soft, main.detach())
    for a, b in zip(g_fused, g_naive, strict=True):
        torch.testing.assert_close(a, b)
    assert [res.main.n_tokens] + [d.n_tokens for d in res.depths] == [18, 16, 14]
    assert res.main.hard is None
    with pytest.raises(ValueError, match=r"^multi_token_kd_loss: labels: expected a labels tensor \(the hard-label "
                                         r"term, alpha=0.5 < 1, needs labels; or pass alpha=1\), got None$"):
        multi_token_kd_loss(s["hs"], s["mtp"], s["w"], None, teacher, alpha=0.5)


@pytest.mark.parametrize("T_len", [9, 2])
def test_hard_only_reproduces_the_models_loss(student, T_len):
    """α = 0 leaves the label CE of each head: lm_loss + λ·mean_k mtp_k, as CausalLM computes it (at T = 2 the
    model runs only depth 1, which has no target: loss 0, still counted in the mean)."""
    s = student
    ids = s["ids"][:, :T_len]
    with torch.no_grad():
        out = s["model"](ids, labels=ids, output_mtp_hidden_states=True, return_logits=False)
    res = multi_token_kd_loss(out.last_hidden_state, out.mtp_hidden_states, s["w"], ids, s["teacher"][:, :T_len],
                              alpha=0.0, mtp_weight=s["cfg"].mtp_loss_weight)
    torch.testing.assert_close(res.total, out.lm_loss + s["cfg"].mtp_loss_weight * out.mtp_loss)
    torch.testing.assert_close(res.mtp, out.mtp_loss)
    assert res.main.soft is not None and res.main.hard is not None


# ------------------------------------------------------------------------------------------ alignment
def oracle_case(shift=(0, 0, 0)):
    """Tokens whose neighbours all differ, an identity head (D = V) and a one-hot teacher whose row j is token
    j+1 (row T-1: an extra token). Head k's row i is one-hot on the token it must predict (i+k+1), displaced by
    shift[k]: only shift 0 everywhere matches every teacher row and label."""
    V, T = 16, 10
    ext = torch.tensor([[(3 * j + 1) % V for j in range(T + 1)], [(5 * j + 2) % V for j in range(T + 1)]])
    ids, scale = ext[:, :T], 40.0
    teacher = scale * F.one_hot(ext[:, 1:], V).float()  # [B, T, V]: row j is token j+1

    def head(k):
        pos = torch.arange(T - k) + k + 1 + shift[k]  # token predicted by row i of depth k
        return scale * F.one_hot(ext[:, pos.clamp(0, T)], V).float()
    return ids, teacher, head(0), [head(1), head(2)], torch.eye(V)


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_alignment_oracle(alpha):
    ids, teacher, hs, mtp, w = oracle_case()
    labels = ids if alpha < 1 else None
    res = multi_token_kd_loss(hs, mtp, w, labels, teacher, alpha=alpha, temperature=1.0)
    assert float(res.total) < 1e-6
    for k, delta in [(0, 1), (1, -1), (1, 1), (2, -1), (2, 1)]:  # an off-by-one in any head shows in that head
        shift = [0, 0, 0]
        shift[k] = delta
        ids, teacher, hs, mtp, w = oracle_case(tuple(shift))
        res = multi_token_kd_loss(hs, mtp, w, labels, teacher, alpha=alpha)
        losses = [float(res.main.total)] + [float(d.total) for d in res.depths]
        assert losses[k] > 1.0 and all(v < 1e-6 for i, v in enumerate(losses) if i != k), (k, delta, losses)


def test_no_mtp_heads_is_the_main_head(student):
    s = student
    y = labels_with_ignored(s["ids"])
    res = multi_token_kd_loss(s["hs"], [], s["w"], y, s["teacher"], temperature=2.0)
    main = kd_loss(s["hs"][:, :-1] @ s["w"].T, s["teacher"][:, :-1], y[:, 1:], temperature=2.0)
    torch.testing.assert_close(res.total, main)
    assert res.mtp is None and res.depths == []


def test_return_terms_false_keeps_the_used_term(student):
    s = student
    for alpha, used in [(1.0, "soft"), (0.0, "hard")]:
        full = multi_token_kd_loss(s["hs"], s["mtp"], s["w"], s["ids"], s["teacher"], alpha=alpha)
        lean = multi_token_kd_loss(s["hs"], s["mtp"], s["w"], s["ids"], s["teacher"], alpha=alpha, return_terms=False)
        torch.testing.assert_close(lean.total, full.total)
        assert getattr(lean.main, used) is not None and getattr(lean.main, "hard" if used == "soft" else "soft") is None
        assert lean.main.n_tokens == full.main.n_tokens == 16


@pytest.mark.parametrize("kind,signal", [("forward_kl", "dense"), ("reverse_kl", "tail"), ("jsd", "renormalise")])
def test_masked_vocabulary_contributes_nothing(student, kind, signal):
    """Head-weight rows that give -inf logits and a teacher masked on the same entries: every head's loss and the
    gradients equal those on the vocabulary without them (the weight's finiteness is found once per call)."""
    s = student
    V = s["cfg"].vocab_size
    masked = torch.tensor([v for v in range(V) if v not in s["ids"].unique().tolist()][:3])
    keep = torch.tensor([v for v in range(V) if v not in masked.tolist()])
    remap = torch.full((V,), -1, dtype=torch.long)
    remap[keep] = torch.arange(len(keep))
    hs, mtp = s["hs"].clone(), [h.clone() for h in s["mtp"]]
    for h in [hs] + mtp:
        h[..., 0] = 1.0
    w_m, t_m = s["w"].clone(), s["teacher"].clone()
    w_m[masked] = 0.0
    w_m[masked, 0] = float("-inf")
    t_m[..., masked] = float("-inf")
    y = labels_with_ignored(s["ids"])
    y_k = torch.where(y == IGNORE, IGNORE, remap[y.clamp_min(0)])
    opts = dict(kind=kind, temperature=2.0, alpha=0.6, depth_weights=[1.0, 3.0])
    got, g_got = grads(lambda a, b, c, w: multi_token_kd_loss(a, [b, c], w, y, make_teacher(t_m, signal), **opts),
                       [hs, *mtp, w_m])
    want, g_want = grads(lambda a, b, c, w: multi_token_kd_loss(a, [b, c], w, y_k,
                                                                make_teacher(t_m[..., keep], signal), **opts),
                         [hs, *mtp, s["w"][keep]])
    torch.testing.assert_close(got.total, want.total)
    for a, b in zip([got.main] + got.depths, [want.main] + want.depths):
        torch.testing.assert_close(a.total, b.total)
    for a, b in zip(g_got[:3], g_want[:3]):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(g_got[3][keep], g_want[3])
    assert (g_got[3][masked] == 0).all()


def test_bad_input(student):
    s = student
    hs, mtp, w, ids, t = s["hs"], s["mtp"], s["w"], s["ids"], s["teacher"]
    cases = [
        (dict(mtp_hidden=[mtp[1], mtp[0]]), r"^multi_token_kd_loss: mtp_hidden\[0\]: expected depth 1's states like "
                                            r"main_hidden's: a float32 tensor of shape \(2, 8, 64\) on cpu, got a "
                                            r"float32 tensor of shape \(2, 7, 64\)$"),
        (dict(mtp_hidden=[mtp[0].double(), mtp[1]]), r"mtp_hidden\[0\]: expected .* a float32 tensor .* got a float64"),
        (dict(mtp_hidden=mtp[0]), r"^multi_token_kd_loss: mtp_hidden: expected a list of \[B, T-k, D\] tensors "
                                  r"\(k = 1, 2, \.\.\.\), got a float32 tensor of shape \(2, 8, 64\)$"),
        (dict(main_hidden_BTD=hs[0]), r"^multi_token_kd_loss: main_hidden: expected a float tensor \[B, T, D\], got a "
                                      r"float32 tensor of shape \(9, 64\)$"),
        (dict(weight_VD=w[:, :8]), r"^multi_token_kd_loss: main_hidden: expected a float tensor \[\.\.\., D\] with "
                                   r"D = 8 like weight"),
        (dict(teacher=t[:, 1:]), r"^multi_token_kd_loss: teacher: expected one row per position: rows \[B, T\] = "
                                 r"\[2, 9\] .*, got \(2, 8\)$"),
        (dict(teacher=TopKTeacher.from_logits(t[:, :-1], 3)), r"teacher: expected one row per position.*got \(2, 8\)$"),
        (dict(teacher=t[..., :-1]), r"^multi_token_kd_loss: teacher: expected logits over the student's vocabulary, "
                                    r"V=\d+ \(vocab size mismatch"),
        (dict(labels_BT=ids[:, 1:]), r"^multi_token_kd_loss: labels: expected the input ids \[B, T\] = \[2, 9\] "
                                     r"\(shifted inside\) or None, got an int64 tensor of shape \(2, 8\)$"),
        (dict(labels_BT=ids.float()), r"^multi_token_kd_loss: labels: expected an int64/int32 tensor of shape "
                                      r"\(2, 9\)"),
        (dict(depth_weights=[1.0]), r"^multi_token_kd_loss: depth_weights: expected 2 finite numbers >= 0 \(one per "
                                    r"MTP depth\) with a positive sum, got \[1.0\]$"),
        (dict(depth_weights=[1.0, -1.0]), r"depth_weights: expected 2 .*, got \[1.0, -1.0\]$"),
        (dict(depth_weights=[0, 0]), r"depth_weights: expected .*positive sum, got \[0, 0\]$"),
        (dict(mtp_weight=-0.1), r"^multi_token_kd_loss: mtp_weight: expected a finite number >= 0, got -0.1$"),
        (dict(kind="kl"), r"^KDLossConfig.kind: expected one of"),
        (dict(temperature=0.0), r"^KDLossConfig.temperature: expected a finite number > 0, got 0.0$"),
        (dict(chunk=0), r"^multi_token_kd_loss: chunk: expected an int >= 1 or None, got 0$"),
    ]
    base = dict(main_hidden_BTD=hs, mtp_hidden=mtp, weight_VD=w, labels_BT=ids, teacher=t)
    for change, msg in cases:
        with pytest.raises(ValueError, match=msg):
            multi_token_kd_loss(**(base | change))
    with pytest.raises(TypeError, match=r"^multi_token_kd_loss: teacher: expected a logits tensor \[\.\.\., V\] or a "
                                        r"TopKTeacher, got \[1.0\]$"):
        multi_token_kd_loss(**(base | dict(teacher=[1.0])))
