"""Teachers behind one interface: a kdarch model and a Hugging Face directory give the model's own logits without
gradients; vocabulary alignment (padding rows cut or -inf padded, top-k padding ids moved to the tail, real
mismatches refused) checked against plain-PyTorch formulas; load_teacher picks the class from a directory."""

import pytest
import torch
import torch.nn.functional as F

from kdarch import CausalLM, get_preset, save_pretrained
from kdarch.distill import CachedTeacher, HFTeacher, ModelTeacher, TeacherOutput, TopKTeacher, kd_loss, load_teacher
from kdarch.distill.logit_cache import write_logit_cache
from kdarch.distill.vocab import VocabMismatchError, align_vocab, vocab_fingerprint

FP = vocab_fingerprint({f"t{i}": i for i in range(256)})
OTHER_FP = vocab_fingerprint({f"u{i}": i for i in range(256)})


def model(seed=0, **overrides):
    torch.manual_seed(seed)
    return CausalLM(get_preset("debug", **overrides)).eval()


def ids(B=2, T=12, V=256, seed=1):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


def ref_forward_kl(s, t, T=2.0):
    """T² · mean over rows of Σ p_t (log p_t − log p_s), with 0 · log 0 = 0 where the teacher logit is -inf."""
    lt, ls = F.log_softmax(t / T, -1), F.log_softmax(s / T, -1)
    pt = lt.exp()
    return T * T * torch.where(pt > 0, pt * (lt - ls), 0).sum(-1).mean()


def write_tokenizer(path, n=256):
    """A tokenizer.json with n word-level tokens; returns its vocabulary fingerprint."""
    from tokenizers import Tokenizer, models
    vocab = {f"w{i}": i for i in range(n)}
    Tokenizer(models.WordLevel(vocab, unk_token="w0")).save(str(path / "tokenizer.json"))
    return vocab_fingerprint(vocab)


# ---------------------------------------------------------------------------------------------------- ModelTeacher
def test_model_teacher_returns_the_models_logits_without_grad():
    m, x = model(), ids()
    with torch.no_grad():
        ref = m(x, output_hidden_states=True)
    m.train()  # the teacher must run it in eval mode anyway
    t = ModelTeacher(m, fingerprint=FP)
    m.train()
    out = t(x, hidden_states=True)
    assert isinstance(out, TeacherOutput) and not m.training
    assert out.signal.dtype == torch.float32 and not out.signal.requires_grad
    torch.testing.assert_close(out.signal, ref.logits, rtol=0, atol=0)
    assert len(out.hidden_states) == len(ref.hidden_states) == m.config.n_layers + 1
    for a, b in zip(out.hidden_states, ref.hidden_states):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert t(x).hidden_states is None
    assert all(p.grad is None for p in m.parameters())
    assert t.vocab_size == 256 and t.fingerprint == FP and t.name.startswith("CausalLM@sha256:")
    # a student loss through the teacher's signal leaves the teacher without gradient
    s = torch.randn(2, 12, 256, requires_grad=True)
    kd_loss(s, out.signal, x, alpha=0.7).backward()
    assert s.grad is not None and all(p.grad is None for p in m.parameters())


def test_model_teacher_name_tracks_weights_and_outputs_float32():
    a, b = model(seed=0), model(seed=1)
    assert ModelTeacher(a).name == ModelTeacher(model(seed=0)).name != ModelTeacher(b).name
    assert ModelTeacher(a, name="big-teacher").name == "big-teacher"
    half = ModelTeacher(model().to(torch.bfloat16))
    assert half(ids()).signal.dtype == torch.float32


def test_model_teacher_bad_input():
    t = ModelTeacher(model())
    with pytest.raises(ValueError, match=r"input_ids: expected token ids in \[0, 256\)"):
        t(torch.tensor([[0, 256]]))
    with pytest.raises(ValueError, match=r"int64/int32 tensor \[B, T\]"):
        t(torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"int64/int32 tensor \[B, T\]"):
        t(torch.zeros(1, 4))
    with pytest.raises(ValueError, match="expected a torch.nn.Module"):
        ModelTeacher("model")
    with pytest.raises(ValueError, match="pass vocab_size"):
        ModelTeacher(torch.nn.Linear(2, 2))

    class NoLogits(torch.nn.Module):
        def forward(self, x, **kw):
            return torch.zeros(*x.shape, 5)
    with pytest.raises(ValueError, match=r"output .logits: expected a tensor of shape \(1, 3, 5\), got .NoneType."):
        ModelTeacher(NoLogits(), vocab_size=5)(torch.zeros(1, 3, dtype=torch.long))


# ---------------------------------------------------------------------------------------------------- HFTeacher
@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    pytest.importorskip("transformers")
    from kdarch.convert.hf import save_hf
    path = tmp_path_factory.mktemp("hf")
    m = model()
    save_hf(m, path)
    return path, m, write_tokenizer(path)


def test_hf_teacher_matches_kdarch_model(hf_dir):
    path, m, fp = hf_dir
    x = ids(T=16)
    with torch.no_grad():
        ref = m(x).logits
    t = HFTeacher(path, dtype=torch.float32)
    out = t(x)
    assert t.fingerprint == fp and t.vocab_size == 256 and t.name.startswith("DeepseekV3ForCausalLM@sha256:")
    assert out.signal.dtype == torch.float32 and not out.signal.requires_grad and not t.model.training
    torch.testing.assert_close(out.signal, ref, rtol=1e-5, atol=1e-5)
    assert all(p.grad is None for p in t.model.parameters())

    bf16 = HFTeacher(path)  # default: bfloat16 compute, float32 logits
    assert next(bf16.model.parameters()).dtype == torch.bfloat16
    sig = bf16(x).signal
    assert sig.dtype == torch.float32 and sig.isfinite().all()
    torch.testing.assert_close(sig, ref, rtol=0, atol=0.05)
    assert bf16.name != t.name

    with pytest.raises(ValueError, match="dtype: expected a floating torch.dtype .*got torch.int8"):
        HFTeacher(path, dtype=torch.int8)


def test_load_teacher_picks_the_class(hf_dir, tmp_path):
    path, m, fp = hf_dir
    assert isinstance(load_teacher(path, dtype=torch.float32), HFTeacher)
    kd = save_pretrained(m, tmp_path / "kdarch")
    t = load_teacher(kd)
    assert type(t) is ModelTeacher and t.fingerprint is None
    torch.testing.assert_close(t(ids()).signal, m(ids()).logits.detach(), rtol=0, atol=0)
    write_tokenizer(kd)
    assert load_teacher(kd).fingerprint == fp
    with pytest.raises(VocabMismatchError, match=OTHER_FP):
        load_teacher(kd, student_fingerprint=OTHER_FP)
    assert load_teacher(kd, student_vocab_size=300, student_fingerprint=fp).vocab_size == 300

    write_logit_cache(t, ids(B=3), tmp_path / "cache", k=4, shard_size=2)
    c = load_teacher(tmp_path / "cache")
    assert isinstance(c, CachedTeacher) and c.name == t.name and c.vocab_size == 256

    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="logit cache .*kdarch model or a Hugging Face causal LM"):
        load_teacher(tmp_path / "empty")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="config.json: expected a JSON object, got list"):
        load_teacher(tmp_path / "bad")


# ---------------------------------------------------------------------------------------------------- alignment
def test_bigger_teacher_is_truncated_and_the_loss_equals_the_sliced_one():
    tm, x = model(vocab_size=300), ids()
    with torch.no_grad():
        full = tm(x).logits
    s = torch.randn(2, 12, 256, generator=torch.Generator().manual_seed(3))
    for kw in (dict(student_fingerprint=FP), dict(n_real_tokens=256), dict(student_fingerprint=FP, n_real_tokens=200)):
        t = ModelTeacher(tm, fingerprint=FP if "student_fingerprint" in kw else None).align_to(256, **kw)
        sig = t(x).signal
        assert t.vocab_size == 256 and sig.shape == (2, 12, 256)
        torch.testing.assert_close(sig, full[..., :256], rtol=0, atol=0)
        loss = kd_loss(s, sig, None, temperature=2.0, alpha=1.0)
        assert loss.isfinite()
        torch.testing.assert_close(loss, ref_forward_kl(s, full[..., :256]), rtol=1e-5, atol=1e-6)


def test_smaller_teacher_is_padded_with_minus_inf():
    tm, x = model(vocab_size=200), ids(V=200)
    with torch.no_grad():
        full = tm(x).logits
    sig = ModelTeacher(tm).align_to(256, n_real_tokens=200)(x).signal
    assert sig.shape == (2, 12, 256) and (sig[..., 200:] == float("-inf")).all()
    torch.testing.assert_close(sig[..., :200], full, rtol=0, atol=0)
    s = torch.randn(2, 12, 256, generator=torch.Generator().manual_seed(3))
    loss = kd_loss(s, sig, None, temperature=2.0, alpha=1.0)
    assert loss.isfinite()
    torch.testing.assert_close(loss, ref_forward_kl(s, sig), rtol=1e-5, atol=1e-6)


def test_vocab_mismatches_are_refused():
    t = ModelTeacher(model(vocab_size=300), fingerprint=FP)
    with pytest.raises(VocabMismatchError) as e:
        t.align_to(256, student_fingerprint=OTHER_FP)
    assert all(s in str(e.value) for s in ("V=300", "V=256", FP, OTHER_FP))
    with pytest.raises(VocabMismatchError, match="pass n_real_tokens"):
        ModelTeacher(model(vocab_size=300)).align_to(256)
    with pytest.raises(VocabMismatchError, match="n_real_tokens=280 real tokens do not fit"):
        t.align_to(256, student_fingerprint=FP, n_real_tokens=280)
    assert issubclass(VocabMismatchError, ValueError)
    assert t.align_to(300, student_fingerprint=FP).vocab_size == 300  # same size: nothing to check
    for bad in (dict(student_vocab_size=0), dict(student_vocab_size=2.5), dict(student_vocab_size=True)):
        with pytest.raises(ValueError, match="student_vocab_size: expected an int >= 1"):
            align_vocab(300, **bad)
    with pytest.raises(ValueError, match=r"expected teacher logits \[..., 300\]"):
        align_vocab(300, 256, n_real_tokens=256).apply(torch.zeros(2, 299))


def topk_with_padding_ids(V=300, K=8, pad_from=256, N=40, seed=0):
    """Dense log-probs [N, V] whose top-k often (not always) includes ids >= pad_from, and their top-k."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(N, V, generator=g)
    logits[:, pad_from:] += 0.5 * torch.rand(N, 1, generator=g)  # rows lean on padding ids by varying amounts
    logp = logits.log_softmax(-1)
    values, top = logp.topk(K, -1)
    return logp, top, values


@pytest.mark.parametrize("form", ["logprobs", "logprobs_no_tail", "logits"])
def test_topk_padding_ids_move_into_the_tail(form):
    logp, top, values = topk_with_padding_ids()
    n_pad = (top >= 256).sum(-1)
    assert n_pad.max() >= 2 and (n_pad == 0).any()  # the case is exercised
    tail = 1 - values.double().exp().sum(-1)
    tk = {"logprobs": TopKTeacher(top, values, "logprobs", tail.float()),
          "logprobs_no_tail": TopKTeacher(top, values),
          "logits": TopKTeacher(top, values + 3.0, "logits", tail.float())}[form]
    out = align_vocab(300, 256, n_real_tokens=256).apply(tk)
    k = 8 - int(n_pad.max())
    assert out.k == k and out.ids.max() < 256 and out.mode == tk.mode and out.values_are == tk.values_are
    for r in range(logp.shape[0]):  # each row keeps its k highest-valued ids below 256, values untouched
        real = top[r][top[r] < 256][:k]
        assert sorted(out.ids[r].tolist()) == sorted(real.tolist())
    by_id = torch.full_like(logp, float("nan")).scatter(-1, top, tk.values)
    torch.testing.assert_close(out.values, by_id.gather(-1, out.ids), rtol=0, atol=0)
    kept_mass = logp.double().gather(-1, out.ids).exp().sum(-1)
    want_tail = (1 - kept_mass).float()
    got_tail = out.tail_mass if out.tail_mass is not None else 1 - out.values.double().exp().sum(-1).float()
    torch.testing.assert_close(got_tail, want_tail, rtol=1e-5, atol=1e-6)
    out.check(256, (logp.shape[0],), "test")


def test_topk_entirely_on_padding_ids_is_refused():
    tk = TopKTeacher(torch.tensor([[1, 2], [260, 270]]), torch.tensor([[-1.0, -2.0], [-0.5, -1.0]]))
    with pytest.raises(ValueError, match="whole top-2 lies on teacher padding ids >= 256"):
        align_vocab(300, 256, n_real_tokens=256).apply(tk)
    same = TopKTeacher(torch.tensor([[1, 2]]), torch.tensor([[-1.0, -2.0]]))
    assert align_vocab(300, 256, n_real_tokens=256).apply(same) is same
    assert align_vocab(200, 256, n_real_tokens=200).apply(same) is same
