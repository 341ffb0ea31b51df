"""FeatureDistiller and uniform_layer_map against per-token loops written out here (autograd for the gradients),
plus gradchecks, masking, invariances, validation, and a tiny student learning a wider, deeper teacher's states."""
import itertools
from fractions import Fraction

import pytest
import torch

import kdarch
from kdarch.distill.features import FeatureDistiller, FeatureKDConfig, uniform_layer_map

B, T, S, D = 2, 5, 6, 8  # batch, tokens, student width, teacher width


# ------------------------------------------------------------------ independent references (no kdarch code)
def ref_token_loss(p, t, loss, normalize):
    if normalize:
        p = (p - p.mean()) / torch.sqrt(((p - p.mean()) ** 2).mean() + 1e-5)
        t = (t - t.mean()) / torch.sqrt(((t - t.mean()) ** 2).mean() + 1e-5)
    if loss == "mse":
        return ((p - t) ** 2).sum() / p.numel()
    return 1 - (p * t).sum() / (p.norm() * t.norm())


def ref_feature_loss(hs, ht, pairs, weights, mask, loss="mse", normalize=False):
    """Mean over pairs of the mean over valid tokens; weights[k] is pair k's [D, S] matrix (None: identity)."""
    per_pair = []
    for (i, j), w in zip(pairs, weights):
        terms = [ref_token_loss(hs[i][b, t] if w is None else w @ hs[i][b, t], ht[j][b, t], loss, normalize)
                 for b in range(B) for t in range(T) if mask is None or mask[b, t]]
        per_pair.append(sum(terms) / len(terms))
    return sum(per_pair) / len(per_pair)


def states(n, width, seed, dtype=torch.float64, grad=False):
    g = torch.Generator().manual_seed(seed)
    return tuple((torch.randn(B, T, width, generator=g, dtype=dtype) * (k + 1)).requires_grad_(grad)
                 for k in range(n))


def random_mask(seed=0):
    mask = torch.rand(B, T, generator=torch.Generator().manual_seed(seed)) > 0.4
    mask[0, 0] = mask[1, -1] = True
    mask[1, 0] = False
    return mask


# ------------------------------------------------------------------------------------------ layer map
def test_uniform_layer_map_examples():
    assert uniform_layer_map(4, 12) == ((1, 3), (2, 6), (3, 9), (4, 12))
    assert uniform_layer_map(3, 4) == ((1, 1), (2, 3), (3, 4))
    assert uniform_layer_map(5, 5) == tuple((i, i) for i in range(1, 6))
    assert uniform_layer_map(1, 7) == ((1, 7),)
    assert uniform_layer_map(2, 12, include_embedding=True) == ((0, 0), (1, 6), (2, 12))


def test_uniform_layer_map_is_nearest_relative_depth():
    for n_s, n_t in itertools.product(range(1, 13), repeat=2):
        for i, j in uniform_layer_map(n_s, n_t):
            # nearest teacher block by relative depth, ties to the deeper one; never the embedding
            dist = [abs(Fraction(k, n_t) - Fraction(i, n_s)) for k in range(1, n_t + 1)]
            best = max(k for k in range(1, n_t + 1) if dist[k - 1] == min(dist))
            assert j == best, (n_s, n_t, i, j)


@pytest.mark.parametrize("args", [(0, 4), (4, 0), (2.0, 4), (True, 4), (-1, 3)])
def test_uniform_layer_map_rejects(args):
    with pytest.raises(ValueError, match=r"^uniform_layer_map: n_(student|teacher): expected an int >= 1, got "):
        uniform_layer_map(*args)


# ---------------------------------------------------------------------------------------------- values
@pytest.mark.parametrize("loss,normalize,masked", [("mse", False, False), ("mse", False, True), ("mse", True, True),
                                                    ("cosine", False, False), ("cosine", False, True),
                                                    ("cosine", True, False)])
def test_values_and_gradients_match_reference(loss, normalize, masked):
    pairs = [(0, 0), (1, 3), (1, 2), (2, 3)]  # one student state to two teacher states, embedding pair included
    fd = FeatureDistiller(S, D, 2, 3, layer_map=pairs, loss=loss, normalize=normalize).double()
    hs, ht = states(3, S, 1, grad=True), states(4, D, 2)
    mask = random_mask() if masked else None
    got = fd(hs, ht, mask)
    weights = [p.weight.detach().clone().requires_grad_() for p in fd.projectors]
    hs_ref = [h.detach().clone().requires_grad_() for h in hs]
    want = ref_feature_loss(hs_ref, ht, pairs, weights, mask, loss, normalize)
    torch.testing.assert_close(got, want)
    got.backward()
    want.backward()
    for a, b in zip(hs, hs_ref):
        torch.testing.assert_close(a.grad, b.grad)
    for p, w in zip(fd.projectors, weights):
        torch.testing.assert_close(p.weight.grad, w.grad)
        assert p.weight.grad.abs().sum() > 0


def test_uniform_map_and_identity_projector():
    fd = FeatureDistiller(D, D, 2, 4, projector="identity", loss="cosine")
    assert fd.config.layer_map == ((1, 2), (2, 4)) and not list(fd.parameters())
    hs, ht = states(3, D, 3), states(5, D, 4)
    torch.testing.assert_close(fd(hs, ht).double(), ref_feature_loss(hs, ht, [(1, 2), (2, 4)], [None, None], None,
                                                                    "cosine"))


def test_bias_projector():
    fd = FeatureDistiller(S, D, 1, 1, bias=True).double()
    hs, ht = states(2, S, 5), states(2, D, 6)
    w, b = fd.projectors[0].weight.detach(), fd.projectors[0].bias.detach()
    want = sum(((w @ hs[1][i, t] + b - ht[1][i, t]) ** 2).mean() for i in range(B) for t in range(T)) / (B * T)
    torch.testing.assert_close(fd(hs, ht), want)


@pytest.mark.parametrize("loss,normalize", [("mse", False), ("cosine", False), ("mse", True)])
def test_gradcheck(loss, normalize):
    fd = FeatureDistiller(3, 4, 1, 2, loss=loss, normalize=normalize).double()
    g = torch.Generator().manual_seed(0)
    hs = [torch.randn(1, 3, 3, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    ht = [torch.randn(1, 3, 4, generator=g, dtype=torch.float64) for _ in range(3)]
    mask = torch.tensor([[True, False, True]])
    assert torch.autograd.gradcheck(lambda a, b: fd((a, b), ht, mask), tuple(hs))


def test_teacher_gets_no_gradient_and_projector_does():
    fd = FeatureDistiller(S, D, 2, 2)
    hs, ht = states(3, S, 7, torch.float32, grad=True), states(3, D, 8, torch.float32, grad=True)
    fd(hs, ht).backward()
    assert all(h.grad is None for h in ht)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in fd.parameters())
    assert hs[2].grad.abs().sum() > 0


def test_masked_tokens_do_not_matter():
    fd = FeatureDistiller(S, D, 2, 2, loss="cosine").double()
    hs, ht, mask = states(3, S, 9), states(3, D, 10), random_mask(1)
    base = fd(hs, ht, mask)
    junk = lambda h: torch.where(mask[..., None], h, torch.full_like(h, float("nan")))  # noqa: E731
    torch.testing.assert_close(fd([junk(h) for h in hs], [junk(h) for h in ht], mask), base)
    assert not torch.allclose(fd(hs, ht), base)  # the mask did exclude something


def test_no_valid_token_gives_zero_with_a_graph():
    fd = FeatureDistiller(S, D, 2, 2)
    hs = states(3, S, 11, torch.float32, grad=True)
    loss = fd(hs, states(3, D, 12, torch.float32), torch.zeros(B, T, dtype=torch.bool))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(hs[1].grad, torch.zeros_like(hs[1]))


def test_cosine_is_blind_to_per_token_scale():
    fd = FeatureDistiller(S, D, 1, 1, loss="cosine").double()
    hs, ht = states(2, S, 13), states(2, D, 14)
    g = torch.Generator().manual_seed(0)
    scale_s, scale_t = (torch.rand(B, T, 1, generator=g, dtype=torch.float64) * 5 + 0.1 for _ in range(2))
    torch.testing.assert_close(fd([h * scale_s for h in hs], [h * scale_t for h in ht]), fd(hs, ht))


def test_low_precision_states():
    fd = FeatureDistiller(S, D, 1, 1)
    hs, ht = states(2, S, 15, torch.bfloat16), states(2, D, 16, torch.float16)
    loss = fd(hs, ht)
    assert loss.dtype == torch.float32
    w = fd.projectors[0].weight.detach().double()
    want = ref_feature_loss([h.double() for h in hs], [h.double() for h in ht], [(1, 1)], [w], None)
    torch.testing.assert_close(loss.double(), want, atol=1e-2, rtol=1e-2)


# ------------------------------------------------------------------------------------------ validation
PAIR = (r"a \(student index, teacher index\) pair of ints, student index in \[0, 2\] and teacher index in \[0, 3\] "
        r"\(0: embedding output, i: block i\)")


@pytest.mark.parametrize("kwargs,match", [
    (dict(layer_map=[(3, 1)]), rf"^FeatureKDConfig.layer_map\[0\]: expected {PAIR}, got \(3, 1\)$"),
    (dict(layer_map=[(1, 1), (1, 4)]), rf"^FeatureKDConfig.layer_map\[1\]: expected {PAIR}, got \(1, 4\)$"),
    (dict(layer_map=[(-1, 1)]), rf"^FeatureKDConfig.layer_map\[0\]: expected {PAIR}, got \(-1, 1\)$"),
    (dict(layer_map=[(1.0, 1)]), rf"^FeatureKDConfig.layer_map\[0\]: expected {PAIR}, got \(1.0, 1\)$"),
    (dict(layer_map=[(True, 1)]), rf"^FeatureKDConfig.layer_map\[0\]: expected {PAIR}, got \(True, 1\)$"),
    (dict(layer_map=[(1, 1, 1)]), rf"^FeatureKDConfig.layer_map\[0\]: expected {PAIR}, got \(1, 1, 1\)$"),
    (dict(layer_map=[]), rf"^FeatureKDConfig.layer_map: expected 'uniform' or a non-empty list of pairs, each {PAIR}, "
                         r"got \[\]$"),
    (dict(layer_map=3), r"^FeatureKDConfig.layer_map: expected 'uniform' or a non-empty list of pairs, .*, got 3$"),
    (dict(layer_map=[(1, 1), (1, 1)]), r"^FeatureKDConfig.layer_map\[1\]: expected a pair not listed before "
                                       r"\(FeatureKDConfig.layer_map\[0\] is the same\), got \(1, 1\)$"),
    (dict(layer_map="last"), r"^FeatureKDConfig.layer_map: expected 'uniform' or a list of \(student index, teacher "
                             r"index\) pairs, got 'last'$"),
    (dict(layer_map=[(1, 1)], include_embedding=True),
     r"^FeatureKDConfig.include_embedding: expected False with an explicit layer_map \(it applies to "
     r"layer_map='uniform' only; add the pair \(0, 0\) to the map instead\), got True$"),
    (dict(loss="l1"), r"^FeatureKDConfig.loss: expected one of 'mse', 'cosine', got 'l1'$"),
    (dict(projector="mlp"), r"^FeatureKDConfig.projector: expected one of 'linear', 'identity', got 'mlp'$"),
    (dict(projector="identity"), r"^FeatureKDConfig.projector: expected 'linear' for student_dim=6 != teacher_dim=8 "
                                 r"\('identity' needs equal widths\), got 'identity'$"),
    (dict(normalize=1), r"^FeatureKDConfig.normalize: expected true or false, got 1$"),
    (dict(bias="no"), r"^FeatureKDConfig.bias: expected true or false, got 'no'$"),
])
def test_config_rejects(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FeatureDistiller(S, D, 2, 3, **kwargs)


@pytest.mark.parametrize("field", ["student_dim", "teacher_dim", "n_student_layers", "n_teacher_layers"])
def test_config_rejects_sizes(field):
    args = dict(student_dim=S, teacher_dim=D, n_student_layers=2, n_teacher_layers=3)
    with pytest.raises(ValueError, match=f"^FeatureKDConfig.{field}: expected an int >= 1, got 0$"):
        FeatureKDConfig(**{**args, field: 0})


def test_forward_rejects_bad_states_and_masks():
    fd = FeatureDistiller(S, D, 2, 3)
    hs, ht = states(3, S, 0, torch.float32), states(4, D, 1, torch.float32)
    with pytest.raises(ValueError, match=r"^FeatureDistiller: student states: expected 3 hidden states \(embedding "
                                         r"output \+ 2 blocks\), got 2$"):
        fd(hs[:2], ht)
    with pytest.raises(ValueError, match=r"^FeatureDistiller: teacher states\[1\]: expected a tensor of width D = 8, "
                                         r"got a float32 tensor of shape \(2, 5, 6\)$"):
        fd(hs, (ht[0], hs[0], ht[2], ht[3]))
    with pytest.raises(ValueError, match=r"^FeatureDistiller: student states\[2\]: expected \[B, T\] = \[2, 5\] like "
                                         r"student states\[0\], got a float32 tensor of shape \(2, 4, 6\)$"):
        fd((hs[0], hs[1], hs[2][:, :4]), ht)
    with pytest.raises(ValueError, match=r"^FeatureDistiller: teacher states: expected \[B, T\] = \[2, 5\] like the "
                                         r"student states, got a float32 tensor of shape \(1, 5, 8\)$"):
        fd(hs, [h[:1] for h in ht])
    with pytest.raises(ValueError, match=r"^FeatureDistiller: student states: expected a non-empty tuple/list of "
                                         r"\[B, T, D\] tensors \(e.g. out.hidden_states\), got a float32 tensor"):
        fd(hs[0], ht)
    with pytest.raises(ValueError, match=r"^FeatureDistiller: student states\[0\]: expected a float tensor "
                                         r"\[B, T, D\], got a float32 tensor of shape \(5, 6\)$"):
        fd((hs[0][0], hs[1], hs[2]), ht)
    with pytest.raises(ValueError, match=r"^FeatureDistiller: mask: expected a bool tensor of shape \[2, 5\] \(True = "
                                         r"valid token\), got a float32 tensor of shape \(2, 5\)$"):
        fd(hs, ht, torch.ones(B, T))
    with pytest.raises(ValueError, match=r"^FeatureDistiller: mask: expected a bool tensor of shape \[2, 5\]"):
        fd(hs, ht, torch.ones(B, T + 1, dtype=torch.bool))


# ------------------------------------------------------------------------------------------ end to end
def test_tiny_student_learns_teacher_features():
    torch.manual_seed(0)
    student = kdarch.CausalLM(kdarch.get_preset("debug"))
    t_cfg = kdarch.get_preset("debug", hidden_size=96, n_layers=3)
    teacher = kdarch.CausalLM(t_cfg).eval().requires_grad_(False)
    s_cfg = student.config
    fd = FeatureDistiller(s_cfg.hidden_size, t_cfg.hidden_size, s_cfg.n_layers, t_cfg.n_layers)
    opt = torch.optim.AdamW(list(student.parameters()) + list(fd.parameters()), lr=3e-3)
    ids = torch.randint(0, s_cfg.vocab_size, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        t_states = teacher(ids, output_hidden_states=True, return_logits=False).hidden_states
    losses = []
    for _ in range(5):
        loss = fd(student(ids, output_hidden_states=True, return_logits=False).hidden_states, t_states)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses
    assert all(p.grad is None for p in teacher.parameters())
