import math

import pytest
import torch
import torch.nn.functional as F

from kdarch import CausalLM, get_preset
from kdarch.model.layers import apply_rope, rope_frequencies
from kdarch.model.moe import Gate, MoE


def make(seed=0, **changes):
    torch.manual_seed(seed)
    return CausalLM(get_preset("debug", **changes))


def ids(b=2, t=16, v=256, seed=1):
    return torch.randint(0, v, (b, t), generator=torch.Generator().manual_seed(seed))


def test_forward_shapes_and_outputs():
    model = make()
    x = ids()
    out = model(x, output_hidden_states=True, output_mtp_logits=True)
    assert out.logits.shape == (2, 16, 256)
    assert out.loss is None and out.last_hidden_state.shape == (2, 16, 64)
    assert len(out.hidden_states) == model.config.n_layers + 1
    assert [lg.shape for lg in out.mtp_logits] == [(2, 15, 256)]
    torch.testing.assert_close(model.head(out.last_hidden_state), out.logits)


def test_hidden_states_only_forward_for_distillation():
    """return_logits=False without labels computes no head; MTP hidden states feed the head like its logits."""
    model = make(n_mtp_modules=2)
    x = ids()
    ref = model(x, output_mtp_logits=True)
    out = model(x, output_mtp_hidden_states=True, return_logits=False)
    assert out.logits is None and out.loss is None and out.mtp_logits == [None, None]
    assert [h.shape for h in out.mtp_hidden_states] == [(2, 15, 64), (2, 14, 64)]
    torch.testing.assert_close(out.last_hidden_state, ref.last_hidden_state)
    for h, logits in zip(out.mtp_hidden_states, ref.mtp_logits):
        torch.testing.assert_close(model.head(h), logits)


def test_losses_match_manual_cross_entropy():
    model = make(seq_aux_loss_coef=0.01)
    x = ids()
    labels = x.clone()
    labels[0, 5] = -100
    out = model.train()(x, labels=labels)
    lm = F.cross_entropy(out.logits[:, :-1].reshape(-1, 256), labels[:, 1:].reshape(-1), ignore_index=-100)
    mtp = F.cross_entropy(out.mtp_logits[0][:, :-1].reshape(-1, 256), labels[:, 2:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.lm_loss, lm)
    torch.testing.assert_close(out.mtp_loss, mtp)
    assert out.balance_loss is not None and out.balance_loss > 0
    torch.testing.assert_close(out.loss, lm + model.config.mtp_loss_weight * mtp + out.balance_loss)


def test_mtp_depth_two_targets():
    model = make(n_mtp_modules=2)
    x = ids(t=12)
    out = model(x, labels=x)
    assert [lg.shape[1] for lg in out.mtp_logits] == [11, 10]
    ce = [F.cross_entropy(lg[:, :-1].reshape(-1, 256), x[:, k + 1:].reshape(-1))
          for k, lg in enumerate(out.mtp_logits, start=1)]
    torch.testing.assert_close(out.mtp_loss, torch.stack(ce).mean())


def test_mtp_module_sees_next_token_embedding():
    """Module 1 at position i must depend on token i+1 and on nothing after it."""
    model = make().eval()
    x = ids(b=1, t=10)
    y = x.clone()
    y[0, 6] = (y[0, 6] + 1) % 256
    a = model(x, output_mtp_logits=True).mtp_logits[0]
    b = model(y, output_mtp_logits=True).mtp_logits[0]
    torch.testing.assert_close(a[:, :5], b[:, :5])  # positions < 5 see tokens <= 5 only
    assert (a[:, 5] - b[:, 5]).abs().max() > 1e-4  # position 5 sees the embedding of token 6


def test_causality():
    model = make().eval()
    x = ids(b=1, t=10)
    y = x.clone()
    y[0, 7] = (y[0, 7] + 3) % 256
    torch.testing.assert_close(model(x).logits[:, :7], model(y).logits[:, :7])


def test_plain_query_projection_and_yarn_run():
    for changes in ({"q_lora_rank": 0}, {"rope_factor": 4.0, "rope_original_max_seq_len": 32}):
        model = make(**changes)
        out = model(ids(), labels=ids())
        out.loss.backward()
        assert torch.isfinite(out.loss)


def test_loss_goes_down():
    model = make()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.attach_bias_update(opt)
    x = ids(b=4, t=32)
    losses = []
    for _ in range(8):
        out = model(x, labels=x)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.lm_loss.item())
    assert losses[-1] < losses[0] - 0.5, losses
    assert any(m.gate.bias.abs().sum() > 0 for m in model.moe_layers())


@pytest.mark.parametrize("bad, match", [
    (torch.zeros(2, 4), "int64/int32"),
    (torch.zeros(8, dtype=torch.long), r"\[batch, seq_len\]"),
    (torch.full((1, 4), 256), r"input_ids: expected token ids in \[0, 256\), got 256"),
    (torch.full((1, 4), -1), r"input_ids: expected token ids in \[0, 256\), got -1"),
    (torch.zeros(1, 129, dtype=torch.long), "max_seq_len=128"),
])
def test_bad_inputs(bad, match):
    with pytest.raises(ValueError, match=match):
        make()(bad)


def test_bad_labels():
    model = make()
    x = ids()
    with pytest.raises(ValueError, match="labels: expected shape"):
        model(x, labels=x[:, :-1])
    with pytest.raises(ValueError, match=r"labels: expected token ids in \[0, 256\) \(or -100 to ignore\), got 300"):
        model(x, labels=torch.full_like(x, 300))


def test_value_checks_switch():
    """Token-id ranges are value checks (a host sync): on under KDARCH_CHECKS=1, skipped when switched off,
    while the free dtype check stays on."""
    from kdarch.checks import set_value_checks
    model, bad = make(), torch.full((1, 4), 256)
    try:
        set_value_checks(False)
        with pytest.raises(IndexError):  # the embedding's own error: kdarch did not read the values
            model(bad)
        with pytest.raises(ValueError, match="int64/int32"):
            model(bad.float())
    finally:
        set_value_checks(None)
    with pytest.raises(ValueError, match="expected token ids"):
        model(bad)


# --- router and balancing -----------------------------------------------------------------------

def _gate(**changes):
    torch.manual_seed(0)
    gate = Gate(get_preset("debug", **changes))
    torch.nn.init.normal_(gate.weight, std=0.5)
    return gate


def test_gate_weights_are_normalised_and_scaled():
    gate = _gate()
    topk_ids, w, scores = gate(torch.randn(32, 64))
    torch.testing.assert_close(w.sum(-1), torch.full((32,), gate.scaling))
    chosen = scores.gather(1, topk_ids)
    torch.testing.assert_close(w / gate.scaling, chosen / chosen.sum(-1, keepdim=True))


def test_group_limited_routing_stays_in_allowed_groups():
    gate = _gate(n_routed_experts=8, n_group=4, topk_group=2, num_experts_per_tok=3)
    x = torch.randn(64, 64)
    topk_ids, _, scores = gate(x)
    group_scores = scores.view(64, 4, 2).topk(2, dim=-1).values.sum(-1)
    allowed = group_scores.topk(2, dim=-1).indices
    for t in range(64):
        assert set((topk_ids[t] // 2).tolist()) <= set(allowed[t].tolist())


def test_bias_changes_selection_not_weights():
    gate = _gate(n_group=1, topk_group=1)
    x = torch.randn(16, 64)
    ids0, _, scores = gate(x)
    gate.bias[3] = 10.0  # expert 3 now always chosen
    ids1, w1, _ = gate(x)
    assert (ids1 == 3).any(-1).all() and not (ids0 == 3).any(-1).all()
    expected = scores.gather(1, ids1)
    torch.testing.assert_close(w1, expected / expected.sum(-1, keepdim=True) * gate.scaling)


def test_softmax_scores():
    gate = _gate(score_func="softmax", norm_topk_prob=False, routed_scaling_factor=1.0)
    topk_ids, w, scores = gate(torch.randn(8, 64))
    torch.testing.assert_close(scores.sum(-1), torch.ones(8))
    torch.testing.assert_close(w, scores.gather(1, topk_ids))


def test_bias_update_moves_toward_balance():
    torch.manual_seed(0)
    moe = MoE(get_preset("debug", n_group=1, topk_group=1, bias_update_speed=0.01))
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.1)
    moe.tokens_per_expert.copy_(torch.tensor([10., 0, 0, 0, 0, 0, 0, 6]))  # mean 2
    load = moe.update_bias()
    torch.testing.assert_close(load, torch.tensor([10., 0, 0, 0, 0, 0, 0, 6]) / 16)
    torch.testing.assert_close(moe.gate.bias, torch.tensor([-1., 1, 1, 1, 1, 1, 1, -1]) * 0.01)
    assert moe.tokens_per_expert.sum() == 0
    moe.train()(torch.randn(2, 5, 64))
    assert moe.tokens_per_expert.sum() == 2 * 5 * moe.top_k


def test_seq_balance_loss_formula():
    torch.manual_seed(0)
    moe = MoE(get_preset("debug", seq_aux_loss_coef=0.1))
    topk_ids = torch.tensor([[[0, 1], [0, 2]]])  # B=1, T=2, K=2
    scores = torch.rand(1, 2, 8)
    f = torch.zeros(8)
    f[0], f[1], f[2] = 2, 1, 1
    f = f * 8 / (2 * 2)
    p = (scores / scores.sum(-1, keepdim=True)).mean(1)[0]
    torch.testing.assert_close(moe.seq_balance_loss(topk_ids, scores), 0.1 * (f * p).sum())


# --- rope -----------------------------------------------------------------------------------------

def test_rope_rotates_interleaved_pairs_and_is_relative():
    cfg = get_preset("debug")
    freqs = rope_frequencies(cfg)
    q, k = torch.randn(1, 1, 8), torch.randn(1, 1, 8)

    def rot(x, pos):
        ang = torch.tensor([[pos]], dtype=torch.float32) * freqs
        return apply_rope(x, ang.cos(), ang.sin())
    # pair (x0, x1) turned by freqs[0]
    x = torch.zeros(1, 1, 8)
    x[..., 0] = 1.0
    r = rot(x, 1.0)
    torch.testing.assert_close(r[0, 0, :2], torch.stack([freqs[0].cos(), freqs[0].sin()]))
    d1 = (rot(q, 3.0) * rot(k, 1.0)).sum()
    d2 = (rot(q, 12.0) * rot(k, 10.0)).sum()
    torch.testing.assert_close(d1, d2)


def test_yarn_keeps_fast_and_stretches_slow_frequencies():
    cfg = get_preset("debug", qk_rope_head_dim=64, rope_factor=40.0, rope_original_max_seq_len=4096)
    base = rope_frequencies(get_preset("debug", qk_rope_head_dim=64))
    yarn = rope_frequencies(cfg)
    torch.testing.assert_close(yarn[:4], base[:4])
    torch.testing.assert_close(yarn[-4:], base[-4:] / 40.0)
    mscale = 0.1 * math.log(40.0) + 1.0
    assert math.isclose(cfg.softmax_scale, cfg.qk_head_dim ** -0.5 * mscale ** 2)
