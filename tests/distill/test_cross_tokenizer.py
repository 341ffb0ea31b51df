"""Distillation across tokenizers: byte-span alignment on hand-made tokenizations whose spans are known, the shared
vocabulary of a hand-made pair, `align` reducing to `kd_loss` for one tokenizer (values and gradients), `uld`
against a hand-written formula and its invariance to renumbering the teacher's vocabulary, and a short
distillation between two byte-level BPE tokenizers of different sizes."""
import math

import pytest
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

from kdarch import CausalLM, get_preset
from kdarch.distill import (
    CrossTokenizerOutput,
    CrossTokenizerTeacher,
    ModelTeacher,
    TeacherOutput,
    VocabMismatchError,
    align_spans,
    align_text,
    align_vocab,
    cross_tokenizer_kd_loss,
    kd_loss,
    retokenize,
    shared_vocab,
)
from kdarch.distill.cross_tokenizer import _unicode_to_byte
from kdarch.train.data import embedded_corpus
from kdarch.train.tokenizer import BPETokenizer, ByteTokenizer, byte_to_unicode

ALPHABET = byte_to_unicode()


def byte_bpe(merges, specials=(), bos=None):
    """A byte-level BPE: the 256 byte characters, then one token per merge (in merge order), then `specials`;
    with `bos`, a post-processor that puts that special token before every text."""
    vocab = {c: i for i, c in enumerate(ALPHABET)}
    for a, b in merges:
        vocab[a + b] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=list(merges)))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(specials))
    if bos is not None:
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A",
                                                           special_tokens=[(bos, vocab_of(tok)[bos])])
    return tok


def vocab_of(tok):
    return tok.get_vocab(with_added_tokens=True)


def word_level(words, pre):
    vocab = {w: i for i, w in enumerate(["[UNK]", *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre
    return tok


DAY = [("Ġ", "d"), ("Ġd", "a"), ("Ġda", "y")]


# ---------------------------------------------------------------------------------------------------- alignment
def test_byte_table_is_the_byte_level_one():
    assert _unicode_to_byte() == {c: b for b, c in enumerate(ALPHABET)}
    assert set(_unicode_to_byte()) == set(pre_tokenizers.ByteLevel.alphabet())


def test_align_spans_on_given_spans():
    # student: [0,2) [2,7) [7,11); teacher: [0,3) [3,7) [7,11): only "predict [7,11) after byte 7" is shared
    assert align_spans([(0, 2), (2, 7), (7, 11)], [(0, 3), (3, 7), (7, 11)]) == [-1, 1, -1]
    # the same next span after a different prefix end is not aligned (the teacher saw other text)
    assert align_spans([(0, 2), (3, 5)], [(0, 1), (3, 5)]) == [-1, -1]
    assert align_spans([(0, 1), (1, 2), (2, 3)], [(0, 0), (0, 1), (1, 2), (2, 3)]) == [1, 2, -1]
    assert align_spans([], [(0, 1)]) == []


def test_bpe_subwords_that_do_not_line_up():
    s = byte_bpe([("u", "n"), ("h", "a"), ("ha", "p"), ("hap", "p"), ("happ", "y"), *DAY])
    t = byte_bpe([("u", "n"), ("un", "h"), ("a", "p"), ("ap", "p"), ("app", "y"), *DAY])
    r = align_text("unhappy day", s, t)
    assert s.encode("unhappy day").tokens == ["un", "happy", "Ġday"]
    assert t.encode("unhappy day").tokens == ["unh", "appy", "Ġday"]
    assert r.student_spans == [[(0, 2), (2, 7), (7, 11)]] and r.teacher_spans == [[(0, 3), (3, 7), (7, 11)]]
    assert r.teacher_pos.tolist() == [[-1, 1, -1]]
    assert r.teacher_ids.tolist() == [t.encode("unhappy day").ids] and r.teacher_lengths.tolist() == [3]


def test_multibyte_character_split_across_byte_tokens():
    s, t = byte_bpe([]), byte_bpe([("Ã", "©")])  # "é" is C3 A9: two tokens for the student, one for the teacher
    enc = s.encode("é x")
    assert enc.tokens == ["Ã", "©", "Ġ", "x"] and enc.offsets[:2] == [(0, 1), (0, 1)]  # character offsets
    r = align_text("é x", s, t)
    assert r.student_spans == [[(0, 1), (1, 2), (2, 3), (3, 4)]]
    assert r.teacher_spans == [[(0, 2), (2, 3), (3, 4)]]
    assert r.teacher_pos.tolist() == [[-1, 0, 1, -1]]  # nothing predicts the half character A9
    r = align_text("é x", t, s)  # the other way round: the teacher's own bytes, not its character offsets
    assert r.teacher_spans == [[(0, 1), (1, 2), (2, 3), (3, 4)]] and r.teacher_pos.tolist() == [[1, 2, -1]]
    # a row cut inside the character: the teacher gets the text after the stray byte, which aligns nothing
    r = retokenize(torch.tensor([[0xA9, ord("x"), ord("y")]]), ByteTokenizer(), t)
    assert r.teacher_ids.tolist() == [t.encode("xy").ids] and r.teacher_spans == [[(1, 2), (2, 3)]]
    assert r.teacher_pos.tolist() == [[-1, 0, -1]]


def test_byte_fallback_pieces_of_one_character():
    vocab = {"<unk>": 0, "<0xC3>": 1, "<0xA9>": 2, "a": 3, "x": 4}
    s = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    s.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    enc, t = s.encode("aéx"), byte_bpe([("Ã", "©")])
    assert enc.tokens == ["a", "<0xC3>", "<0xA9>", "x"] and enc.offsets[1:3] == [(1, 2), (1, 2)]
    # both halves of "é" carry its offsets: the boundary between them is unknown, so "a" -> <0xC3> must not pair
    # with the teacher's "a" -> "é" (bytes [1, 3)); "é" -> "x" does
    r = align_text("aéx", s, t)
    assert r.student_spans == [[(0, 1), (1, -1), (-1, 3), (3, 4)]] and r.teacher_spans == [[(0, 1), (1, 3), (3, 4)]]
    assert r.teacher_pos.tolist() == [[-1, -1, 1, -1]]
    assert align_text("aéx", t, s).teacher_pos.tolist() == [[-1, 2, -1]]
    assert align_spans([(0, 1), (1, -1), (-1, 3)], [(0, 1), (1, -1), (-1, 3)]) == [-1, -1, -1]


def test_word_level_tokenizers_with_gaps_and_bytes_not_characters():
    s = word_level(["café", "cat.", "the"], pre_tokenizers.WhitespaceSplit())
    t = word_level(["café", "cat", ".", "the"], pre_tokenizers.Whitespace())  # splits the full stop off
    r = align_text("café cat. the", s, t)
    assert r.student_spans == [[(0, 5), (6, 10), (11, 14)]]  # bytes: "é" is two (in characters café ends at 4)
    assert r.teacher_spans == [[(0, 5), (6, 9), (9, 10), (11, 14)]]
    assert r.teacher_pos.tolist() == [[-1, 2, -1]]
    # ids the student tokenizer does not give back from their text ("a.b" re-encodes as a . b): each token's span
    # is what it adds to the decoded text, leading space left out
    s = word_level(["a.b", "a", ".", "b"], pre_tokenizers.Whitespace())
    assert s.encode(s.decode([1, 2])).ids == [2, 3, 4, 2]
    r = retokenize([[1, 2]], s, t)
    assert r.student_spans == [[(0, 3), (4, 5)]] and r.teacher_spans == [[(0, 1), (1, 2), (2, 3), (4, 5)]]
    assert r.teacher_ids.tolist() == [[0, 3, 0, 0]] and r.teacher_pos.tolist() == [[2, -1]]


def test_special_tokens_map_by_role_and_a_teacher_bos_is_prepended():
    s = BPETokenizer(byte_bpe([], ["<|bos|>", "<|eos|>"]), bos_id=256, eos_id=257)
    tt = byte_bpe([("c", "d")], ["<s>", "</s>"], bos="<s>")
    t = BPETokenizer(tt, bos_id=vocab_of(tt)["<s>"], eos_id=vocab_of(tt)["</s>"])
    cd = vocab_of(tt)["cd"]
    r = retokenize(torch.tensor([[ord("a"), ord("b"), 257, ord("c"), ord("d")]]), s, t)
    assert r.teacher_ids.tolist() == [[t.bos_id, ord("a"), ord("b"), t.eos_id, cd]]
    assert r.teacher_spans == [[(0, 0), (0, 1), (1, 2), (2, 3), (3, 5)]]
    assert r.teacher_pos.tolist() == [[1, 2, -1, -1, -1]]  # "eos" predicted by both; "c" vs "cd" is not
    r = retokenize(torch.tensor([[256, ord("a"), ord("b")], [ord("a"), ord("b"), ord("b")]]), s, t)
    assert r.teacher_ids.tolist() == [[t.bos_id, ord("a"), ord("b"), 0], [t.bos_id, ord("a"), ord("b"), ord("b")]]
    assert r.teacher_lengths.tolist() == [3, 4] and r.teacher_pos.tolist() == [[0, 1, -1], [1, 2, -1]]
    # a raw tokenizers.Tokenizer has no roles: specials pair by content only, and "<|eos|>" is not in it
    assert retokenize([[ord("a"), 257, ord("b")]], s, tt).teacher_ids.tolist() == [[t.bos_id, ord("a"), ord("b")]]


# ---------------------------------------------------------------------------------------------------- vocabulary
def test_shared_vocabulary_of_a_hand_made_pair():
    s = word_level(["a", "b", "ab", "Ġa"], pre_tokenizers.Whitespace())
    s.add_special_tokens(["<eos>"])
    t = byte_bpe([("Ġ", "a"), ("a", "b")], ["<eos>"])
    tv = vocab_of(t)
    sid, tid = shared_vocab(s, t)
    # "Ġa" is the text Ġa for the word-level tokenizer (C4 A0 61) but the bytes " a" for the byte-level one
    want = [(1, ord("a")), (2, ord("b")), (3, tv["ab"]), (5, tv["<eos>"])]
    assert list(zip(sid.tolist(), tid.tolist())) == want
    assert sid.dtype == tid.dtype == torch.long
    a = byte_bpe([("Ġ", "a"), *DAY])
    b = byte_bpe(DAY)
    sid, tid = shared_vocab(a, b)
    want = [(i, i) for i in range(256)] + [(257 + k, 256 + k) for k in range(3)]  # all but "Ġa"
    assert list(zip(sid.tolist(), tid.tolist())) == want
    with pytest.raises(TypeError, match="shared_vocab: student: expected a kdarch Tokenizer or a tokenizers"):
        shared_vocab("bytes", b)


def test_refusal_names_the_cross_tokenizer_options():
    with pytest.raises(VocabMismatchError, match='distill.cross_tokenizer = "uld" or "align"'):
        align_vocab(300, 256, teacher_fingerprint="sha256:a", student_fingerprint="sha256:b")


# ---------------------------------------------------------------------------------------------------- losses
def tiny_model(V, seed=0):
    torch.manual_seed(seed)
    return CausalLM(get_preset("debug", vocab_size=V, n_mtp_modules=0)).eval()


def roundtrip_rows(tok, T, n):
    """n rows of T ids, each the start of a corpus line that the tokenizer re-encodes to the same ids."""
    rows = []
    for line in " ".join(embedded_corpus()[:3]).split("\n"):
        r = tok.encode(line)[:T]
        if len(r) == T and tok.encode(tok.decode(r)) == r:
            rows.append(r)
        if len(rows) == n:
            return torch.tensor(rows)
    raise AssertionError("not enough lines")


@pytest.mark.parametrize("tok", ["bytes", "bpe"])
def test_align_with_one_tokenizer_is_kd_loss(tok):
    tok = ByteTokenizer() if tok == "bytes" else BPETokenizer.train(embedded_corpus()[:3], 300)
    V = tok.vocab_size
    ids = roundtrip_rows(tok, 10, 3)
    m = tiny_model(V)
    ct = CrossTokenizerTeacher(ModelTeacher(m), tok, tok)
    out = ct(ids, hidden_states=True)
    assert isinstance(out, CrossTokenizerOutput) and isinstance(out, TeacherOutput)
    assert torch.equal(out.teacher_ids, ids)
    assert out.teacher_pos.tolist() == [list(range(9)) + [-1]] * 3 and out.aligned.sum() == 27
    assert out.shared_student_ids.tolist() == out.shared_teacher_ids.tolist() == list(range(V))
    ref_signal = ModelTeacher(m)(ids).signal
    torch.testing.assert_close(out.signal[:, :-1], ref_signal[:, :-1], rtol=0, atol=0)
    assert len(out.hidden_states) == 3 and out.hidden_states[0].shape == (3, 10, 64)
    labels = ids.clone()
    labels[1, 4] = -100
    g = torch.Generator().manual_seed(0)
    for kind, dtype, tol in (("forward_kl", torch.float64, 1e-12), ("reverse_kl", torch.float64, 1e-12),
                             ("jsd", torch.float64, 1e-12), ("tvd", torch.float64, 1e-12),
                             ("forward_kl", torch.float32, 2e-6)):
        s = (3 * torch.randn(3, 10, V, generator=g, dtype=torch.float64)).to(dtype).requires_grad_()
        kw = dict(kind=kind, temperature=2.0, alpha=0.3, beta=0.4)
        got = cross_tokenizer_kd_loss(s, out, labels, mode="align", return_terms=True, **kw)
        want = kd_loss(s[:, :-1], ref_signal[:, :-1].to(dtype), labels[:, 1:], return_terms=True, **kw)
        for a, b in ((got.total, want.total), (got.soft, want.soft), (got.hard, want.hard)):
            torch.testing.assert_close(a, b, rtol=tol, atol=tol)
        assert got.n_tokens == want.n_tokens == got.n_aligned == 26
        (ga,), (gb,) = torch.autograd.grad(got.total, s), torch.autograd.grad(want.total, s)
        torch.testing.assert_close(ga, gb, rtol=tol, atol=tol)


def fake_output(signal, pos, Vs):
    pos = torch.tensor(pos)
    return CrossTokenizerOutput(signal, None, pos, None, torch.arange(Vs), torch.arange(Vs), Vs)


def uld_reference(s, t, pos, labels, temperature, weight, hard_weight=1.0, Vs=None):
    """Plain-Python ULD: hard_weight · mean CE + weight · Σ |sorted p_s − sorted p_t| (zero-padded; the student's
    first Vs logits) averaged over aligned labelled rows."""
    def softmax(row):
        m = max(row)
        e = [math.exp((x - m) / temperature) for x in row]
        return [x / sum(e) for x in e]
    dist, ces = [], []
    for b in range(len(s)):
        for j in range(len(s[b]) - 1):
            y = labels[b][j + 1]
            if y == -100:
                continue
            row = s[b][j]
            ces.append(math.log(sum(math.exp(x) for x in row)) - row[y])
            if pos[b][j] >= 0:
                ps, pt = sorted(softmax(row[:Vs]), reverse=True), sorted(softmax(t[b][j]), reverse=True)
                n = max(len(ps), len(pt))
                ps, pt = ps + [0.0] * (n - len(ps)), pt + [0.0] * (n - len(pt))
                dist.append(sum(abs(a - c) for a, c in zip(ps, pt)))
    return hard_weight * sum(ces) / len(ces) + weight * sum(dist) / len(dist)


def test_uld_against_a_hand_written_reference():
    g = torch.Generator().manual_seed(0)
    s = (2 * torch.randn(2, 4, 5, generator=g, dtype=torch.float64)).requires_grad_()
    t = 2 * torch.randn(2, 4, 3, generator=g, dtype=torch.float64)  # a smaller teacher vocabulary: padded
    pos = [[1, -1, 0, -1], [2, 2, -1, -1]]
    labels = torch.tensor([[0, 1, 2, 3], [4, 0, -100, 2]])
    out = fake_output(t, pos, 5)
    got = cross_tokenizer_kd_loss(s, out, labels, mode="uld", temperature=1.5, uld_weight=0.7, return_terms=True)
    want = uld_reference(s.tolist(), t.tolist(), pos, labels.tolist(), 1.5, 0.7)
    torch.testing.assert_close(got.total, torch.tensor(want, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    assert got.n_aligned == 3 and got.n_tokens == 5
    # gradient against autograd through another formula: softmax first, then sort
    ps = (s / 1.5).softmax(-1).sort(-1, descending=True).values
    pt = F.pad((t / 1.5).softmax(-1).sort(-1, descending=True).values, (0, 2))
    keep = torch.tensor([[1, 0, 1, 0], [1, 0, 0, 0]], dtype=torch.bool)  # aligned and labelled
    y = torch.cat([labels[:, 1:], torch.full((2, 1), -100)], 1)
    ref = F.cross_entropy(s.reshape(-1, 5), y.reshape(-1)) + 0.7 * (ps - pt).abs().sum(-1)[keep].mean()
    torch.testing.assert_close(ref, got.total, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.autograd.grad(got.total, s)[0], torch.autograd.grad(ref, s)[0], rtol=1e-12,
                               atol=1e-12)
    # hard_weight, and a student head with a padding row beyond its tokenizer's 4 ids: kept out of the sorted vector
    got = cross_tokenizer_kd_loss(s, fake_output(t, pos, 4), labels, mode="uld", temperature=1.5, uld_weight=0.7,
                                  hard_weight=0.2)
    want = uld_reference(s.tolist(), t.tolist(), pos, labels.tolist(), 1.5, 0.7, hard_weight=0.2, Vs=4)
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    # no labels: only the distance, over every aligned row
    soft = cross_tokenizer_kd_loss(s, out, None, mode="uld", temperature=1.5)
    torch.testing.assert_close(soft, (ps - pt).abs().sum(-1)[torch.tensor(pos) >= 0].mean(), rtol=1e-12, atol=1e-12)


def test_uld_ignores_the_teachers_numbering_exactly():
    g = torch.Generator().manual_seed(1)
    s = torch.randn(2, 6, 40, generator=g, requires_grad=True)
    t = 3 * torch.randn(2, 6, 57, generator=g)
    pos = [[0, 1, -1, 3, 4, -1], [5, -1, 2, 3, 1, -1]]
    labels = torch.randint(0, 40, (2, 6), generator=g)
    perm = torch.randperm(57, generator=g)
    a = cross_tokenizer_kd_loss(s, fake_output(t, pos, 40), labels, mode="uld")
    b = cross_tokenizer_kd_loss(s, fake_output(t[..., perm], pos, 40), labels, mode="uld")
    assert torch.equal(a, b)
    assert torch.equal(torch.autograd.grad(a, s)[0], torch.autograd.grad(b, s)[0])
    # align does depend on the pairing: the soft term moves when the teacher's columns are renumbered
    kw = dict(mode="align", alpha=1.0)
    assert cross_tokenizer_kd_loss(s, fake_output(t[..., :40], pos, 40), labels, **kw) != \
        cross_tokenizer_kd_loss(s, fake_output(t[..., perm[perm < 40]], pos, 40), labels, **kw)


def test_bad_input_is_refused():
    s, out = torch.randn(1, 4, 5), fake_output(torch.randn(1, 4, 3), [[0, -1, 1, -1]], 5)
    labels = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="mode: expected one of 'align', 'uld', got 'refuse'"):
        cross_tokenizer_kd_loss(s, out, labels, mode="refuse")
    with pytest.raises(TypeError, match="out: expected a CrossTokenizerOutput"):
        cross_tokenizer_kd_loss(s, TeacherOutput(torch.randn(1, 4, 5)), labels)
    with pytest.raises(ValueError, match=r"student_logits: expected float logits \[B, T, V_s\] with \[B, T\] = \[1, 4"):
        cross_tokenizer_kd_loss(torch.randn(1, 3, 5), out, labels)
    with pytest.raises(ValueError, match="V_s >= 5"):
        cross_tokenizer_kd_loss(torch.randn(1, 4, 4), out, labels)
    with pytest.raises(ValueError, match="labels: expected a labels tensor .*alpha=0.5 < 1"):
        cross_tokenizer_kd_loss(s, out, None)
    with pytest.raises(ValueError, match=r"labels: expected token ids in \[0, 5\)"):
        cross_tokenizer_kd_loss(s, out, labels + 7)
    with pytest.raises(ValueError, match="kind: expected one of"):
        cross_tokenizer_kd_loss(s, out, labels, kind="kl")
    tok, other = ByteTokenizer(), BPETokenizer.train(["hello there"] * 4, 270)
    teacher = ModelTeacher(tiny_model(other.vocab_size), fingerprint=other.fingerprint)
    with pytest.raises(VocabMismatchError, match="teacher_tokenizer .* is not the teacher's"):
        CrossTokenizerTeacher(teacher, other, tok)
    ct = CrossTokenizerTeacher(teacher, tok, other)
    with pytest.raises(VocabMismatchError, match="is not that of the student_tokenizer"):
        ct.align_to(259, student_fingerprint=other.fingerprint)
    assert ct.align_to(300, student_fingerprint=tok.fingerprint).student_vocab_size == 300
    with pytest.raises(ValueError, match=r"student token ids in \[0, 300\), got 300"):
        ct(torch.tensor([[1, 300]]))
    with pytest.raises(ValueError, match="teacher_tokenizer: expected a vocabulary that fits the teacher's 256"):
        CrossTokenizerTeacher(ModelTeacher(tiny_model(256)), tok, other.__class__.train(["hello there"] * 9, 300))


# ---------------------------------------------------------------------------------------------------- end to end
def test_distillation_between_two_bpe_tokenizers():
    docs = embedded_corpus()[:8]
    s_tok, t_tok = BPETokenizer.train(docs, 320), BPETokenizer.train(docs, 480)
    text = "\n".join(docs)
    T, B = 32, 8

    def rows(tok, n):
        ids = tok.encode(text)
        return torch.tensor(ids[:n * T]).view(n, T)

    t_rows, s_rows = rows(t_tok, 64), rows(s_tok, 64)
    teacher = tiny_model(t_tok.vocab_size, seed=1).train()
    opt = torch.optim.AdamW(teacher.parameters(), lr=1e-2)
    for step in range(40):
        batch = t_rows[(step * B) % 64:][:B]
        loss = teacher(batch, labels=batch, return_logits=False).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss < 5.0  # log(480) = 6.2 at the start
    ct = CrossTokenizerTeacher(teacher, s_tok, t_tok)  # a model: wrapped in a ModelTeacher
    # every aligned pair reads the same bytes and predicts the same bytes (checked with the tokenizers' own tokens)
    piece = lambda tok, i: bytes(_unicode_to_byte()[c] for c in tok.to_hf().id_to_token(i))
    out, n = ct(s_rows[:B]), 0
    for b in range(B):
        s_ids, t_ids = s_rows[b].tolist(), out.teacher_ids[b].tolist()
        for j, i in enumerate(out.teacher_pos[b].tolist()):
            if i >= 0:
                n += 1
                assert piece(s_tok, s_ids[j + 1]) == piece(t_tok, t_ids[i + 1])
                assert b"".join(piece(s_tok, x) for x in s_ids[:j + 1]) == \
                    b"".join(piece(t_tok, x) for x in t_ids[:i + 1])
    assert n == int(out.aligned.sum()) > 0
    for mode in ("align", "uld"):
        student = tiny_model(s_tok.vocab_size, seed=2).train()
        opt = torch.optim.AdamW(student.parameters(), lr=1e-2)
        totals, softs, fractions = [], [], []
        for step in range(40):
            batch = s_rows[(step * B) % 64:][:B]
            terms = cross_tokenizer_kd_loss(student(batch).logits, ct(batch), batch, mode=mode, temperature=1.0,
                                            alpha=0.5, return_terms=True)
            opt.zero_grad()
            terms.total.backward()
            opt.step()
            totals.append(terms.total.item())
            softs.append(terms.soft.item())
            fractions.append((terms.n_aligned / terms.n_tokens).item())
        mean = lambda xs: sum(xs) / len(xs)
        assert mean(totals[-5:]) < 0.8 * mean(totals[:5]), (mode, totals)
        assert mean(softs[-5:]) < 0.5 * mean(softs[:5]), (mode, softs)  # the student moves towards the teacher
        assert 0.3 < mean(fractions) < 0.95, (mode, fractions)  # 320 vs 480 tokens: about half the rows align
