"""Held-out evaluation: loss and bits per byte against plain formulas, a teacher of another tokenizer scored on
the same bytes as the students, generation speed as the median of repeated runs."""
import math

import pytest
import torch
import torch.nn.functional as F

from kdarch import CausalLM, get_preset
from kdarch.distill import CrossTokenizerTeacher, ModelTeacher
from kdarch.train.data import embedded_corpus
from kdarch.train.evaluate import (
    evaluate_cross_tokenizer_teacher,
    evaluate_lm,
    generation_speed,
    speculative_speed,
    token_bytes,
)
from kdarch.train.tokenizer import BPETokenizer, ByteTokenizer


def model(V, seed=0):
    torch.manual_seed(seed)
    return CausalLM(get_preset("debug", vocab_size=V)).eval()


def rows(tok, n=3, T=24):
    ids = tok.encode(" ".join(embedded_corpus()[:3]))
    return torch.tensor(ids[:n * T]).view(n, T)


def test_loss_and_bits_per_byte_match_the_formulas():
    tok = BPETokenizer.train(embedded_corpus()[:30], 400)
    m, x = model(tok.vocab_size), rows(tok)
    out = evaluate_lm(m, x, token_bytes_V=token_bytes(tok))
    with torch.no_grad():
        nll = F.cross_entropy(m(x).logits[:, :-1].transpose(1, 2), x[:, 1:], reduction="sum").item()
    n_bytes = sum(len(tok.decode([i]).encode()) for i in x[:, 1:].reshape(-1).tolist())
    assert out["eval_loss"] == pytest.approx(nll / x[:, 1:].numel(), rel=1e-5)
    assert out["bits_per_byte"] == pytest.approx(nll / n_bytes / math.log(2), rel=1e-5)
    assert "bits_per_byte" not in evaluate_lm(m, x)
    special = token_bytes(tok)[[tok.bos_id, tok.eos_id, tok.pad_id]]
    assert special.tolist() == [0, 0, 0]


def test_a_teacher_of_another_tokenizer_is_scored_on_the_students_bytes():
    """Through a CrossTokenizerTeacher whose tokenizer is the student's own, the teacher's bits per byte are the
    ones `evaluate_lm` gives it directly; with a byte-level teacher under a BPE student, its bytes are the
    student's (the text after each row's first student token)."""
    tok = BPETokenizer.train(embedded_corpus()[:30], 400)
    m, x = model(tok.vocab_size), rows(tok)
    direct = evaluate_lm(ModelTeacher(m), x, token_bytes_V=token_bytes(tok))
    via = evaluate_cross_tokenizer_teacher(CrossTokenizerTeacher(m, tok, tok), x)
    assert via["bits_per_byte"] == pytest.approx(direct["bits_per_byte"], rel=1e-5)
    assert via["eval_loss_own_tokens"] == pytest.approx(direct["eval_loss"], rel=1e-5)

    byte_tok = ByteTokenizer()
    bm = model(byte_tok.vocab_size, seed=1)
    out = evaluate_cross_tokenizer_teacher(CrossTokenizerTeacher(bm, tok, byte_tok), x)
    student_bytes = sum(len(tok.decode(r[1:].tolist()).encode()) for r in x)
    assert out["eval_tokens_own"] == student_bytes  # one byte-level teacher token per byte the students predict
    text = [tok.decode(r.tolist()).encode() for r in x]
    first = [len(tok.decode(r[:1].tolist()).encode()) for r in x]
    nll = 0.0
    with torch.no_grad():
        for t, f in zip(text, first):  # each row's bytes as the byte-level model's ids
            logp_U = bm(torch.tensor([list(t)])).logits[0].log_softmax(-1)
            nll -= sum(logp_U[i - 1, t[i]].item() for i in range(f, len(t)))
    assert out["bits_per_byte"] == pytest.approx(nll / student_bytes / math.log(2), rel=1e-4)


def test_generation_speed_is_the_median_of_repeated_runs(monkeypatch):
    import kdarch.train.evaluate as ev
    clock = iter([0.0, 1.0, 10.0, 10.5, 20.0, 28.0])  # three runs of 1, 0.5 and 8 seconds
    monkeypatch.setattr(ev.time, "perf_counter", lambda: next(clock))
    out = generation_speed(model(64), [[1, 2, 3, 4]] * 2, new_tokens=5, repeats=3)
    assert out["generate_tokens_per_s"] == pytest.approx(2 * 5 / 1.0) and out["generate_repeats"] == 3


def test_speculative_figures_count_the_drafts_and_compare_with_greedy():
    from kdarch.model import generate_speculative
    m, prompts = model(64), [[1, 2, 3, 4], [5, 6, 7]]
    out = speculative_speed(m, prompts, 6)
    stats = [generate_speculative(m, p, 6, eos_token_id=-1)[1] for p in prompts]
    assert out["mtp_acceptance"] == sum(s.accepted for s in stats) / sum(s.drafted for s in stats)
    assert out["speculative_speedup"] == pytest.approx(out["speculative_tokens_per_s"] /
                                                       out["greedy_batch1_tokens_per_s"])
    assert speculative_speed(CausalLM(get_preset("debug", vocab_size=64, n_mtp_modules=0)), prompts, 6) == {}


def test_generation_speeds_of_several_models_take_turns():
    """Round r times every model once, so a slow spell on a busy machine hits every row alike."""
    calls = []

    class Recorder:
        config = type("Config", (), {"figures": lambda self: {}})()

        def __init__(self, name):
            self.name = name

        def eval(self):
            return self

        def generate(self, prompts, n, eos_token_id=None):
            calls.append((self.name, n))
            return [[0] * n for _ in prompts]

    from kdarch.train.evaluate import generation_speeds
    out = generation_speeds({"a": (Recorder("a"), [[1, 2]]), "b": (Recorder("b"), [[3, 4], [5, 6]])},
                            new_tokens=7, repeats=3)
    assert calls == [("a", 2), ("b", 2)] + [("a", 7), ("b", 7)] * 3  # warm-ups, then three rounds
    assert set(out) == {"a", "b"} and out["b"]["generate_batch"] == 2 and out["a"]["generate_repeats"] == 3
