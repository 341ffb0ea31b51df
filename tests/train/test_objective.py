"""The train script's distillation objective: relation KD on hidden states or on the MLA latents."""
import pytest
import torch

from kdarch import CausalLM, get_preset
from kdarch.distill import ModelTeacher, RelationDistiller, capture_mla_latents
from kdarch.train.config import DistillSection
from kdarch.train.objective import DistillObjective


def _models():
    torch.manual_seed(0)
    teacher = CausalLM(get_preset("debug", hidden_size=96, n_heads=6, kv_lora_rank=48)).eval()
    student = CausalLM(get_preset("debug"))
    return ModelTeacher(teacher), student


@pytest.mark.parametrize("source", ["hidden", "mla"])
def test_relation_loss_uses_the_configured_states(source):
    teacher, student = _models()
    cfg = DistillSection(relation_weight=1.0, relation_source=source, relation_kind="rkd_distance")
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    got = DistillObjective(teacher, student, cfg, total_steps=10)(student, torch.arange(2), ids, 0.0)
    # the same relation loss computed here from states captured independently of the objective
    rel = RelationDistiller(kind="rkd_distance", over="tokens", source=source)
    with torch.no_grad():
        if source == "mla":
            with capture_mla_latents(student) as s, capture_mla_latents(teacher.model) as t:
                student(ids), teacher.model(ids)
            want = rel(s[0], t[0])
        else:
            want = rel(student(ids, output_hidden_states=True).hidden_states,
                       teacher.model(ids, output_hidden_states=True).hidden_states)
    assert got.metrics["relation_loss"] == pytest.approx(want.item(), rel=1e-5)


def test_mla_relations_need_mla_models_before_any_step():
    teacher, student = _models()

    class Plain(torch.nn.Module):  # logits, but no MLA latent norm
        config = type("C", (), {"vocab_size": 256})()

        def forward(self, ids, **kw):
            return type("O", (), {"logits": torch.zeros(*ids.shape, 256)})()
    cfg = DistillSection(relation_weight=1.0, relation_source="mla")
    with pytest.raises(ValueError, match="has no MLA latent norm"):
        DistillObjective(ModelTeacher(Plain()), student, cfg, total_steps=10)


def test_cross_tokenizer_objective_trains_the_main_head_through_the_kd_loss():
    """With a teacher of another tokenizer the gradient must come from α · soft + (1 − α) · hard on the main
    head's logits (the logits a forward with labels returns carry no autograd history): it reaches the head and
    changes with α; and with α = 0 it is the hard CE's alone."""
    from kdarch.distill import CrossTokenizerTeacher
    from kdarch.train.data import embedded_corpus
    from kdarch.train.tokenizer import BPETokenizer, ByteTokenizer

    tok, byte_tok = BPETokenizer.train(embedded_corpus()[:20], 300), ByteTokenizer()
    torch.manual_seed(0)
    teacher = CausalLM(get_preset("debug", vocab_size=byte_tok.vocab_size)).eval()
    ids = torch.tensor(tok.encode(embedded_corpus()[0])[:2 * 24]).view(2, 24)
    grads = {}
    for alpha in (0.0, 0.5, 0.9):
        torch.manual_seed(1)
        student = CausalLM(get_preset("debug", vocab_size=tok.vocab_size, n_mtp_modules=0))
        ct = CrossTokenizerTeacher(ModelTeacher(teacher), tok, byte_tok).align_to(tok.vocab_size)
        obj = DistillObjective(ct, student, DistillSection(cross_tokenizer="align", alpha=f"constant:{alpha}",
                                                           mtp=False), 10)
        obj(student, torch.arange(2), ids, 0.0).loss.backward()
        grads[alpha] = student.head.weight.grad.clone()
    assert all(g.abs().sum() > 0 for g in grads.values())
    assert not torch.allclose(grads[0.5], grads[0.9]) and not torch.allclose(grads[0.0], grads[0.9])
    torch.manual_seed(1)
    student = CausalLM(get_preset("debug", vocab_size=tok.vocab_size, n_mtp_modules=0))
    torch.nn.functional.cross_entropy(student(ids).logits[:, :-1].reshape(-1, tok.vocab_size),
                                      ids[:, 1:].reshape(-1)).backward()
    torch.testing.assert_close(grads[0.0], student.head.weight.grad, rtol=1e-4, atol=1e-6)


def _padded_rows(B=4, T=12, pad=0):
    """Rows of their own lengths (3..T tokens, then padding): every head has its own target count per row."""
    ids = torch.randint(1, 256, (B, T), generator=torch.Generator().manual_seed(2))
    keep = torch.tensor([T, 3, 7, 5][:B])
    return ids.masked_fill(torch.arange(T) >= keep[:, None], pad)


def _split_step(objective, model, ids, halves=((0, 1), (2, 3))):
    """The step's loss and gradients as the train loop builds them: micro-batches prepared first, each term of each
    divided by the step's count of its targets, losses summed and backpropagated one micro-batch at a time."""
    from kdarch.train.objective import MicroBatch
    parts = [objective.prepare(model, torch.tensor(r), ids[list(r)], 0.0) for r in halves]
    step_C = torch.stack([b.counts_C for b in parts]).sum(0)
    loss, metrics = 0.0, {}
    for b in parts:
        assert isinstance(b, MicroBatch)
        b.step_counts_C = step_C
        res = objective(model, b.indices_B, b, 0.0)
        res.loss.backward()
        loss += res.loss.detach()
        for k, v in res.metrics.items():
            metrics[k] = metrics.get(k, 0.0) + v
    return loss, metrics, {n: q.grad.clone() for n, q in model.named_parameters() if q.grad is not None}


def test_lm_terms_of_micro_batches_add_up_to_the_full_batch_means_by_hand():
    """Each term (main head, every MTP depth, the per-sequence balance loss) divided by its own count over the
    step: two micro-batches of padded rows give the full batch's loss and gradients, computed here in plain torch."""
    import torch.nn.functional as F

    from kdarch.train.objective import LMObjective
    torch.manual_seed(0)
    cfg = get_preset("debug", n_mtp_modules=2, seq_aux_loss_coef=0.01)
    model, ids = CausalLM(cfg), _padded_rows()
    with torch.no_grad():
        model.head.weight.mul_(30)  # confident logits: tokens' losses far apart, so how they are averaged shows
    labels = ids.masked_fill(ids == 0, -100)
    out = model(ids, output_mtp_logits=True)  # no labels: plain logits, the losses by hand below
    T, V = ids.shape[1], cfg.vocab_size
    main = F.cross_entropy(out.logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1))
    depths = [F.cross_entropy(lg[:, :T - k - 1].reshape(-1, V), labels[:, k + 1:].reshape(-1))
              for k, lg in enumerate(out.mtp_logits, start=1)]
    want = main + cfg.mtp_loss_weight * sum(depths) / len(depths) + out.balance_loss
    want.backward()
    want_grads = {n: q.grad.clone() for n, q in model.named_parameters() if q.grad is not None}
    model.zero_grad()
    halves = ((1, 3), (0, 2))  # main-head shares 6 / 23 and 17 / 23, depth 2's 2 / 15 and 13 / 15
    loss, metrics, grads = _split_step(LMObjective(pad_id=0), model, ids, halves)
    torch.testing.assert_close(loss, want.detach(), rtol=1e-5, atol=0)
    torch.testing.assert_close(metrics["lm_loss"], main.detach(), rtol=1e-5, atol=0)
    torch.testing.assert_close(metrics["mtp_loss"], (sum(depths) / len(depths)).detach(), rtol=1e-5, atol=0)
    assert grads.keys() == want_grads.keys()
    for n, g in grads.items():
        torch.testing.assert_close(g, want_grads[n], rtol=1e-4, atol=1e-6 * want_grads[n].abs().max().item(), msg=n)
    # the parts' own MTP means weighted by their main-head targets, as before, are another number here
    wrong = 0.0
    for r in halves:
        n = (labels[list(r), 1:] != -100).sum() / (labels[:, 1:] != -100).sum()
        wrong += model(ids[list(r)], labels=labels[list(r)]).mtp_loss.detach() * n
    assert abs(wrong - metrics["mtp_loss"]) / metrics["mtp_loss"] > 1e-2


def test_mtp_kd_heads_of_micro_batches_add_up_to_the_full_batch_means():
    """multi_token_kd_loss with the step's normalisers: the parts' totals are the whole batch's (its own means on
    all rows), and at α = 0 that is the hard CE of every head, computed here in plain torch."""
    import torch.nn.functional as F

    from kdarch.distill.mtp import multi_token_kd_loss, target_counts
    g = torch.Generator().manual_seed(3)
    B, T, D, V = 4, 10, 16, 32
    h = torch.randn(B, T, D, generator=g)
    mtp = [torch.randn(B, T - k, D, generator=g) for k in (1, 2)]
    w = torch.randn(V, D, generator=g)
    teacher = torch.randn(B, T, V, generator=g)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[1, 3:] = labels[2, 6:] = -100
    halves = (slice(0, 1), slice(1, 4))
    step_C = sum(target_counts(labels[r], 2) for r in halves)
    torch.testing.assert_close(step_C, target_counts(labels, 2))
    for alpha in (0.0, 0.5):
        kw = dict(depth_weights=[2.0, 1.0], mtp_weight=0.3, alpha=alpha, temperature=2.0)
        whole = multi_token_kd_loss(h, mtp, w, labels, teacher, **kw)
        parts = [multi_token_kd_loss(h[r], [m[r] for m in mtp], w, labels[r], teacher[r], normalisers=step_C[1:], **kw)
                 for r in halves]
        torch.testing.assert_close(sum(p.total for p in parts), whole.total, rtol=1e-5, atol=0)
        torch.testing.assert_close(sum(p.mtp for p in parts), whole.mtp, rtol=1e-5, atol=0)
        # the parts' own MTP means weighted by their main-head targets, as before, are another number here
        wrong = sum((2 * p.depths[0].total + p.depths[1].total) / 3 * (p.main.n_tokens / step_C[1]) for p in parts)
        assert abs(wrong - whole.mtp) / whole.mtp > 5e-4  # 50x the tolerance above
    ce = [F.cross_entropy((x[:, :T - 1 - k] @ w.T).reshape(-1, V), labels[:, k + 1:].reshape(-1))
          for k, x in enumerate([h, *mtp])]
    torch.testing.assert_close(sum(p.total for p in [multi_token_kd_loss(h[r], [m[r] for m in mtp], w, labels[r],
                                                                        teacher[r], normalisers=step_C[1:],
                                                                        depth_weights=[2.0, 1.0], mtp_weight=0.3,
                                                                        alpha=0.0) for r in halves]),
                               ce[0] + 0.3 * (2 * ce[1] + ce[2]) / 3, rtol=1e-5, atol=0)


def test_auto_alpha_follows_how_the_student_started():
    """distill.alpha = "auto": 0.5 for a student that starts from its teacher's weights, 0.9 for a random one;
    an explicit schedule is used as given either way."""
    teacher, student = _models()
    for inherited, want in ((True, 0.5), (False, 0.9)):
        obj = DistillObjective(teacher, student, DistillSection(), total_steps=10, inherited=inherited)
        assert obj.schedule.at(0, 10)[0] == pytest.approx(want) and obj.schedule.at(9, 10)[0] == pytest.approx(want)
        explicit = DistillObjective(teacher, student, DistillSection(alpha="constant:0.7"),
                                    total_steps=10, inherited=inherited)
        assert explicit.schedule.at(5, 10)[0] == pytest.approx(0.7)
    with pytest.raises(ValueError, match=r'distill.alpha: schedule .autoo.*\(or "auto"\)'):
        DistillSection(alpha="autoo")
