"""Relation KD losses against loop formulas written out here, their invariances and gradients, the
RelationDistiller's grouping and masking, and capture_mla_latents on kdarch (and Hugging Face) models."""
import itertools

import pytest
import torch
from torch import nn

import kdarch
from kdarch.distill.relations import (
    RelationDistiller,
    capture_mla_latents,
    rkd_angle_loss,
    rkd_distance_loss,
    similarity_preserving_loss,
)

LOSSES = {"rkd_distance": rkd_distance_loss, "rkd_angle": rkd_angle_loss,
          "similarity_preserving": similarity_preserving_loss}


# ------------------------------------------------------------------ independent references (no kdarch code)
def huber(a, b):
    d = abs(a - b)
    return 0.5 * d * d if d < 1 else d - 0.5


def ref_distance(s, t):
    def psi(x):
        pairs = list(itertools.combinations(range(len(x)), 2))
        d = [torch.sqrt(((x[i] - x[j]) ** 2).sum()) for i, j in pairs]
        mu = sum(d) / len(d)
        return [v / mu for v in d]
    ps, pt = psi(s), psi(t)
    return sum(huber(a, b) for a, b in zip(ps, pt)) / len(ps)


def ref_angle(s, t):
    def cos(x, i, j, k):
        e1, e2 = x[i] - x[j], x[k] - x[j]
        return (e1 * e2).sum() / (e1.norm() * e2.norm())
    trip = list(itertools.permutations(range(len(s)), 3))
    return sum(huber(cos(s, i, j, k), cos(t, i, j, k)) for i, j, k in trip) / len(trip)


def ref_sp(s, t):
    def gram(x):
        g = torch.stack([torch.stack([(a * b).sum() for b in x]) for a in x])
        return torch.stack([row / row.norm() for row in g])
    return ((gram(s) - gram(t)) ** 2).sum() / len(s) ** 2


REFS = {"rkd_distance": ref_distance, "rkd_angle": ref_angle, "similarity_preserving": ref_sp}


def points(n, width, seed, dtype=torch.float64):
    return torch.randn(n, width, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def rotation(width, seed):
    return torch.linalg.qr(points(width, width, seed))[0]


# ---------------------------------------------------------------------------------------------- losses
@pytest.mark.parametrize("kind", LOSSES)
@pytest.mark.parametrize("n", [3, 7])
def test_values_and_gradients_match_reference(kind, n):
    s, t = points(n, 5, 1).requires_grad_(), points(n, 9, 2)
    s_ref = s.detach().clone().requires_grad_()
    got, want = LOSSES[kind](s, t), REFS[kind](s_ref, t)
    torch.testing.assert_close(got, want)
    assert want > 1e-3  # the comparison means something
    got.backward()
    want.backward()
    torch.testing.assert_close(s.grad, s_ref.grad)


@pytest.mark.parametrize("kind", LOSSES)
def test_gradcheck(kind):
    s, t = points(5, 4, 3).requires_grad_(), points(5, 6, 4)
    assert torch.autograd.gradcheck(lambda x: LOSSES[kind](x, t), (s,))


@pytest.mark.parametrize("kind", LOSSES)
def test_fp32_far_from_origin(kind):
    """Hidden states share a large common component; the loss must not lose the differences to rounding."""
    s = (points(6, 16, 5) + 300 * points(1, 16, 7)).float()
    t = (points(6, 24, 6) + 300 * points(1, 24, 8)).float()
    got = LOSSES[kind](s, t)
    assert got.dtype == torch.float32
    want = REFS[kind](s.double(), t.double())
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", LOSSES)
def test_invariances(kind):
    """All three: blind to a global scale and a rotation of either side; RKD also to translation."""
    s, t = points(6, 5, 9), points(6, 7, 10)
    base = LOSSES[kind](s, t)
    torch.testing.assert_close(LOSSES[kind](3.7 * s, 0.2 * t), base)
    torch.testing.assert_close(LOSSES[kind](s @ rotation(5, 11), t @ rotation(7, 12)), base)
    if kind != "similarity_preserving":
        torch.testing.assert_close(LOSSES[kind](s + 4.0, t - points(1, 7, 13)), base)
    # identical geometry costs nothing, whatever the widths
    torch.testing.assert_close(LOSSES[kind](2 * t @ rotation(7, 14)[:, :7], t), torch.zeros((), dtype=torch.float64),
                               atol=1e-12, rtol=0)


def test_rkd_angle_with_an_outlier_and_a_near_duplicate_matches_fp64():
    """An attention-sink-like token with huge activations and two almost equal tokens (over="tokens"): fp32
    cosines must come out as the fp64 loop formula gives them, values and gradients. The Gram-matrix form
    cancelled here (fp32: 22% off in value, 100% in gradient; fp64 Gram: ~3e-6 in gradient); the differences
    themselves stay at fp32 rounding."""
    s, t = points(10, 16, 21), points(10, 24, 22)
    s[0] *= 1000.0
    t[0] *= 3000.0  # outliers
    s[2], t[2] = s[1] + 1e-3 * points(1, 16, 23)[0], t[1] + 1e-3 * points(1, 24, 24)[0]  # near-duplicates
    s32 = s.float().requires_grad_()
    got = rkd_angle_loss(s32, t.float())
    assert got.dtype == torch.float32
    s64 = s32.detach().double().requires_grad_()  # the same fp32 values, exactly, in fp64
    want = ref_angle(s64, t.float().double())
    assert want > 1e-2  # the comparison means something
    assert abs(got.item() - want.item()) <= 1e-6 * abs(want.item())
    got.backward()
    want.backward()
    torch.testing.assert_close(s32.grad.double(), s64.grad, rtol=1e-5, atol=1e-6 * s64.grad.abs().max().item())


def test_rkd_angle_near_duplicate_apex_over_tokens_matches_fp64():
    """The same through RelationDistiller(over="tokens"): per sequence, a sink token 1e4 times the others and a
    near-duplicate of the apex token."""
    hs, ht = state_pair(41, dtype=torch.float32)
    hs, ht = [h.clone() for h in hs], [h.clone() for h in ht]
    for h in (hs[-1], ht[-1]):
        h[:, 0] *= 1e4
        h[:, 3] = h[:, 2] + 1e-3 * h[:, 4]
    s32 = hs[-1].clone().requires_grad_()
    got = RelationDistiller("rkd_angle", "tokens")(hs[:-1] + [s32], ht)
    s64 = s32.detach().double().requires_grad_()
    want = sum(ref_angle(s64[b], ht[-1][b].double()) for b in range(B)) / B
    assert abs(got.item() - want.item()) <= 1e-6 * abs(want.item())
    got.backward()
    want.backward()
    torch.testing.assert_close(s32.grad.double(), s64.grad, rtol=1e-5, atol=1e-6 * s64.grad.abs().max().item())


def test_sp_row_normalisation():
    """Scaling one row of a side scales its Gram row; only the normalised rows survive in that row."""
    s, t = points(5, 4, 15), points(5, 6, 16)
    c = torch.tensor([1.0, 1.0, 4.0, 1.0, 1.0], dtype=torch.float64)[:, None]
    torch.testing.assert_close(similarity_preserving_loss(s * c, t), ref_sp(s * c, t))
    assert not torch.allclose(similarity_preserving_loss(s * c, t), similarity_preserving_loss(s, t))


@pytest.mark.parametrize("kind", LOSSES)
def test_teacher_gets_no_gradient(kind):
    s, t = points(5, 4, 17).requires_grad_(), points(5, 6, 18).requires_grad_()
    LOSSES[kind](s, t).backward()
    assert t.grad is None and s.grad.abs().sum() > 0


@pytest.mark.parametrize("kind", ["rkd_distance", "rkd_angle"])
def test_coincident_points_stay_finite(kind):
    s, t = points(5, 4, 19), points(5, 6, 20)
    s[3] = s[1]
    s.requires_grad_()
    loss = LOSSES[kind](s, t)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()


def test_angle_cosine_zero_at_coincident_apex():
    """Student points 0 and 1 coincide: an angle with a zero-length side counts as cos 0."""
    s = torch.tensor([[0.0, 0.0], [0.0, 0.0], [1.0, 0.0]], dtype=torch.float64)
    t = torch.tensor([[0.0, 0.0], [0.0, 1.0], [1.0, 0.0]], dtype=torch.float64)
    r = 2 ** -0.5
    # (i, apex, k): (1,0,2), (2,0,1): student 0, teacher 0 | (0,1,2), (2,1,0): student 0 (zero side), teacher r
    #               (0,2,1), (1,2,0): student 1, teacher r
    want = (2 * huber(0.0, r) + 2 * huber(1.0, r)) / 6
    torch.testing.assert_close(rkd_angle_loss(s, t), torch.tensor(want, dtype=torch.float64))


@pytest.mark.parametrize("call,match", [
    (lambda: rkd_distance_loss(points(4, 3, 0), points(5, 3, 0)),
     r"^rkd_distance_loss: teacher: expected the student's N=4 points \[N, width\] \(widths may differ\), got a "
     r"float64 tensor of shape \(5, 3\)$"),
    (lambda: rkd_distance_loss(points(4, 3, 0)[0], points(4, 3, 0)),
     r"^rkd_distance_loss: student: expected a float tensor \[N, width\], got a float64 tensor of shape \(3,\)$"),
    (lambda: similarity_preserving_loss(points(4, 3, 0), torch.ones(4, 3, dtype=torch.long)),
     r"^similarity_preserving_loss: teacher: expected a float tensor \[N, width\], got an int64 tensor"),
    (lambda: rkd_distance_loss(points(1, 3, 0), points(1, 3, 0)),
     r"^rkd_distance_loss: student: expected at least 2 points \[N, width\], got a float64 tensor of shape \(1, 3\)$"),
    (lambda: rkd_angle_loss(points(2, 3, 0), points(2, 3, 0)),
     r"^rkd_angle_loss: student: expected at least 3 points \[N, width\], got a float64 tensor of shape \(2, 3\)$"),
    (lambda: rkd_angle_loss(points(9, 3, 0), points(9, 3, 0), max_n=8),
     r"^rkd_angle_loss: student: expected at most max_n=8 points \(N=9 points make 504 triplets, O\(N³\) memory\): "
     r"subsample the points or raise max_n, got a float64 tensor of shape \(9, 3\)$"),
    (lambda: rkd_angle_loss(points(4, 3, 0), points(4, 3, 0), max_n=2),
     r"^rkd_angle_loss: max_n: expected an int >= 3, got 2$"),
    (lambda: rkd_angle_loss(points(4, 3, 0), points(4, 3, 0), max_n=True),
     r"^rkd_angle_loss: max_n: expected an int >= 3, got True$"),
])
def test_losses_reject(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ---------------------------------------------------------------------------------------------- module
B, T = 4, 6


def state_pair(seed, s_width=5, t_width=7, dtype=torch.float64):
    return ((points(B * T, s_width, seed, dtype).view(B, T, -1),) * 2,
            (points(B * T, t_width, seed + 1, dtype).view(B, T, -1),) * 3)


MASK = torch.tensor([[1, 1, 1, 0, 1, 0], [0, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)


@pytest.mark.parametrize("kind", LOSSES)
def test_over_samples_relates_sequence_means(kind):
    hs, ht = state_pair(21)
    keep = [b for b in range(B) if MASK[b].any()]
    mean = lambda h: torch.stack([h[b][MASK[b]].mean(0) for b in keep])  # noqa: E731
    got = RelationDistiller(kind, "samples")(hs, ht, MASK)
    torch.testing.assert_close(got, REFS[kind](mean(hs[-1]), mean(ht[-1])))
    # without a mask every token counts
    torch.testing.assert_close(RelationDistiller(kind, "samples")(hs, ht), REFS[kind](hs[-1].mean(1), ht[-1].mean(1)))


@pytest.mark.parametrize("kind", LOSSES)
def test_over_tokens_averages_sequences(kind):
    hs, ht = state_pair(23)
    min_n = 3 if kind == "rkd_angle" else 2
    per_seq = [REFS[kind](hs[0][b][MASK[b]], ht[1][b][MASK[b]]) for b in range(B) if MASK[b].sum() >= min_n]
    got = RelationDistiller(kind, "tokens", layers=(0, 1))(hs, ht, MASK)
    torch.testing.assert_close(got, sum(per_seq) / len(per_seq))


@pytest.mark.parametrize("over", ["samples", "tokens"])
def test_module_masked_tokens_do_not_matter_and_teacher_is_detached(over):
    hs, ht = state_pair(25)
    hs = tuple(h.clone().requires_grad_() for h in hs)
    ht = tuple(h.clone().requires_grad_() for h in ht)
    rel = RelationDistiller("similarity_preserving", over)
    base = rel(hs, ht, MASK)
    junk = lambda h: torch.where(MASK[..., None], h, torch.full_like(h, float("nan")))  # noqa: E731
    torch.testing.assert_close(rel([junk(h) for h in hs], [junk(h) for h in ht], MASK), base)
    base.backward()
    assert all(h.grad is None for h in ht) and hs[-1].grad.abs().sum() > 0
    assert torch.equal(hs[-1].grad[~MASK], torch.zeros_like(hs[-1].grad[~MASK]))


def test_module_too_few_valid_points_gives_zero():
    hs, ht = state_pair(27)
    one_each = torch.zeros(B, T, dtype=torch.bool)
    one_each[:, 0] = True
    assert RelationDistiller("rkd_distance", "tokens")(hs, ht, one_each).item() == 0.0
    one_seq = torch.zeros(B, T, dtype=torch.bool)
    one_seq[2] = True
    loss = RelationDistiller("rkd_angle", "samples")(hs, ht, one_seq)
    assert loss.item() == 0.0 and loss.dtype == torch.float64


def test_module_angle_subsamples_evenly():
    hs, ht = state_pair(29)
    got = RelationDistiller("rkd_angle", "tokens", max_points=4)(hs, ht)
    idx = [0, 2, 3, 5]  # round(linspace(0, 5, 4)) = round(0, 5/3, 10/3, 5)
    want = sum(ref_angle(hs[-1][b, idx], ht[-1][b, idx]) for b in range(B)) / B
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("kwargs,match", [
    (dict(kind="cka"), r"^RelationKDConfig.kind: expected one of 'rkd_distance', 'rkd_angle', 'similarity_preserving', "
                       r"got 'cka'$"),
    (dict(kind="distance"), r"^RelationKDConfig.kind: expected one of .*, got 'distance'$"),  # the old names are gone
    (dict(over="batch"), r"^RelationKDConfig.over: expected one of 'samples', 'tokens', got 'batch'$"),
    (dict(source="logits"), r"^RelationKDConfig.source: expected one of 'hidden', 'mla', got 'logits'$"),
    (dict(layers=3), r"^RelationKDConfig.layers: expected a \(student index, teacher index\) pair of ints, got 3$"),
    (dict(layers=(1, 2, 3)), r"^RelationKDConfig.layers: expected a \(student index, teacher index\) pair of ints, "
                             r"got \(1, 2, 3\)$"),
    (dict(layers=(1.0, 2)), r"^RelationKDConfig.layers: expected a \(student index, teacher index\) pair of ints, "
                            r"got \(1.0, 2\)$"),
    (dict(max_points=2), r"^RelationKDConfig.max_points: expected an int >= 3, got 2$"),
])
def test_config_rejects(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RelationDistiller(**kwargs)


def test_one_vocabulary_and_defaults():
    """The kinds are named after the loss functions, as the train config names them; tokens by default."""
    from kdarch.distill.relations import KINDS, RelationKDConfig
    assert KINDS == ("rkd_distance", "rkd_angle", "similarity_preserving")
    assert all(LOSSES[k].__name__ == f"{k}_loss" for k in KINDS)
    cfg = RelationDistiller().config
    assert cfg == RelationKDConfig() and cfg.over == "tokens" and cfg.source == "hidden"


def test_forward_rejects():
    hs, ht = state_pair(31)
    with pytest.raises(ValueError, match=r"^RelationDistiller: RelationKDConfig.layers\[0\]: expected a student index "
                                         r"in \[-2, 1\] into its 2 hidden states, got 2$"):
        RelationDistiller(layers=(2, 0))(hs, ht)
    with pytest.raises(ValueError, match=r"^RelationDistiller: RelationKDConfig.layers\[1\]: expected a teacher index "
                                         r"in \[-3, 2\] into its 3 MLA latents, got -4$"):
        RelationDistiller(source="mla", layers=(0, -4))(hs, ht)
    with pytest.raises(ValueError, match=r"^RelationDistiller: student states: expected at least 3 sequences per batch "
                                         r"\(batch size\) for kind='rkd_angle' over='samples', got a float64 tensor of "
                                         r"shape \(2, 6, 5\)$"):
        RelationDistiller("rkd_angle", "samples")([h[:2] for h in hs], [h[:2] for h in ht])
    with pytest.raises(ValueError, match=r"^RelationDistiller: student states: expected at least 2 tokens per sequence "
                                         r"for kind='similarity_preserving' over='tokens', got a float64 tensor of "
                                         r"shape \(4, 1, 5\)$"):
        RelationDistiller("similarity_preserving", "tokens")([h[:, :1] for h in hs], [h[:, :1] for h in ht])
    with pytest.raises(ValueError, match=r"^RelationDistiller \(source='hidden'\): teacher states: expected "
                                         r"\[B, T\] = \[4, 6\] like the student states, got a float64 tensor of "
                                         r"shape \(4, 5, 7\)$"):
        RelationDistiller()(hs, [h[:, :5] for h in ht])
    with pytest.raises(ValueError, match=r"^RelationDistiller: mask: expected a bool tensor of shape \[4, 6\] \(True = "
                                         r"valid token\), got a float32 tensor of shape \(4, 6\)$"):
        RelationDistiller()(hs, ht, MASK.float())


# ----------------------------------------------------------------------------------------- MLA latents
def _no_hooks(model):
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_capture_mla_latents_matches_hand_computation():
    torch.manual_seed(0)
    model = kdarch.CausalLM(kdarch.get_preset("debug"))
    cfg = model.config
    ids = torch.randint(0, cfg.vocab_size, (2, 7))
    with capture_mla_latents(model) as passes:
        out = model(ids, output_hidden_states=True, return_logits=False)
        assert len(passes) == 1 and len(passes[0]) == cfg.n_layers
        model(ids[:1, :3], return_logits=False)
    assert _no_hooks(model)
    assert [tuple(x.shape) for x in passes[0]] == [(2, 7, cfg.kv_lora_rank)] * cfg.n_layers
    assert [tuple(x.shape) for x in passes[1]] == [(1, 3, cfg.kv_lora_rank)] * cfg.n_layers
    with torch.no_grad():
        for i, layer in enumerate(model.layers):
            kv = layer.attn.wkv_a(layer.attn_norm(out.hidden_states[i]))[..., :cfg.kv_lora_rank]
            rms = kv.pow(2).mean(-1, keepdim=True).add(1e-6).rsqrt()
            torch.testing.assert_close(passes[0][i], kv * rms * layer.attn.kv_norm.weight)
    # the captured student latents carry gradients back to the weights that made them
    rel = RelationDistiller("rkd_distance", "tokens", source="mla")
    rel(passes[0], [x.detach() * 2 + 1 for x in passes[0]]).backward()
    assert model.layers[-1].attn.wkv_a.weight.grad.abs().sum() > 0


def test_capture_mla_latents_removes_hooks_on_error_and_refuses_non_mla():
    model = kdarch.CausalLM(kdarch.get_preset("debug"))
    with pytest.raises(RuntimeError, match="boom"):
        with capture_mla_latents(model):
            raise RuntimeError("boom")
    assert _no_hooks(model)
    with pytest.raises(ValueError, match=r"^mla_latent_norms: model: expected MLA latent norms: modules named "
                                         r"layers.<i>.attn.kv_norm \(kdarch\) or layers.<i>.self_attn.kv_a_layernorm "
                                         r"\(Hugging Face DeepseekV3\), got 'a Sequential that has no MLA latent "
                                         r"norm'$"):
        with capture_mla_latents(nn.Sequential(nn.Linear(2, 2))):
            pass
    with pytest.raises(ValueError, match=r"^mla_latent_norms: model: expected one MLA latent norm per layer, not two "
                                         r"for layer 0 .*, got \['0.layers.0.attn.kv_norm', "
                                         r"'1.layers.0.attn.kv_norm'\]$"):
        with capture_mla_latents(nn.ModuleList([model, kdarch.CausalLM(kdarch.get_preset("debug"))])):
            pass


def test_capture_mla_latents_hugging_face_matches_kdarch():
    pytest.importorskip("transformers")
    from kdarch.convert.hf import to_hf_model
    torch.manual_seed(1)
    model = kdarch.CausalLM(kdarch.get_preset("debug")).eval()
    hf = to_hf_model(model, attn_implementation="eager")
    ids = torch.randint(0, model.config.vocab_size, (2, 5))
    with torch.no_grad(), capture_mla_latents(model) as ours, capture_mla_latents(hf) as theirs:
        model(ids, return_logits=False)
        hf(ids)
    assert _no_hooks(hf) and len(theirs) == 1 and len(theirs[0]) == model.config.n_layers
    for a, b in zip(ours[0], theirs[0]):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
