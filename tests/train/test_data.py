"""Documents, splits, packing and batches: values against plain-Python references written here (bytes
joined by hand, index sets), determinism, exact resume, and every error path."""
import json

import pytest
import torch

from kdarch.train.data import Batches, embedded_corpus, load_documents, pack, split_documents
from kdarch.train.tokenizer import BPETokenizer, ByteTokenizer


# ------------------------------------------------------------------------------------------------ documents
def test_embedded_corpus():
    from pydoc_data.topics import topics
    docs = embedded_corpus()
    assert docs == embedded_corpus() == load_documents("embedded")
    assert len(docs) == len(topics) and docs[0] == topics[min(topics)] and docs[-1] == topics[max(topics)]
    assert all(isinstance(d, str) and d.strip() for d in docs)


def test_load_txt_and_directory(tmp_path):
    (tmp_path / "b.txt").write_text("second\n\nparagraph two\n", encoding="utf-8")
    (tmp_path / "a.txt").write_text("first — ünïcode", encoding="utf-8")
    (tmp_path / "blank.txt").write_text("  \n\n ", encoding="utf-8")
    (tmp_path / "notes.md").write_text("ignored", encoding="utf-8")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.txt").write_text("nested", encoding="utf-8")
    assert load_documents(tmp_path / "b.txt") == ["second\n\nparagraph two\n"]     # one file = one document
    assert load_documents(str(tmp_path)) == ["first — ünïcode", "second\n\nparagraph two\n", "nested"]


def test_load_jsonl(tmp_path):
    path = tmp_path / "docs.jsonl"
    rows = [{"text": "one", "id": 1}, {"text": "twö\nlines", "body": "x"}, {"text": ""}]
    path.write_text("\n".join(json.dumps(r) for r in rows[:2]) + "\n\n" + json.dumps(rows[2]) + "\n", "utf-8")
    assert load_documents(path) == ["one", "twö\nlines"]                              # blank lines/texts skipped
    path.write_text(json.dumps({"body": "b1"}) + "\n" + json.dumps({"body": "b2"}), "utf-8")
    assert load_documents(path, field="body") == ["b1", "b2"]


@pytest.mark.parametrize("content, match", [
    ('{"text": "ok"}\n{"text": "ok"}\n{"text": oops}\n', r"line 3 is not valid JSON"),
    ('{"text": "ok"}\n{"other": "x"}\n', r"line 2: expected a JSON object with a string field 'text', got nothing"),
    ('{"text": 5}\n', r"line 1: .*got int"),
    ('["text"]\n', r"line 1: expected a JSON object"),
    ('{"text": "  "}\n', r"holds no non-empty document"),
])
def test_load_jsonl_errors(tmp_path, content, match):
    path = tmp_path / "bad.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match=match):
        load_documents(path)


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="'embedded'.*does not exist"):
        load_documents(tmp_path / "missing.txt")
    with pytest.raises(ValueError, match="holds no .txt files"):
        load_documents(tmp_path)
    (tmp_path / "data.csv").write_text("a,b", encoding="utf-8")
    with pytest.raises(ValueError, match=r"expected a .txt or .jsonl file, got 'data.csv'"):
        load_documents(tmp_path / "data.csv")
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    with pytest.raises(ValueError, match="not UTF-8"):
        load_documents(tmp_path / "latin1.txt")
    (tmp_path / "latin1.txt").write_text("\n", encoding="utf-8")
    with pytest.raises(ValueError, match="no non-empty document"):
        load_documents(tmp_path / "latin1.txt")
    with pytest.raises(TypeError, match="'embedded' or a path"):
        load_documents(None)


# ------------------------------------------------------------------------------------------------ split
def test_split_by_documents_deterministic_disjoint():
    docs = [f"doc {i}" for i in range(40)]
    train, held = split_documents(docs, 0.1, seed=3)
    assert (train, held) == split_documents(docs, 0.1, seed=3)
    assert len(held) == 4 and len(train) == 36
    assert not set(train) & set(held) and sorted(train + held) == sorted(docs)
    assert train == [d for d in docs if d in set(train)] and held == [d for d in docs if d in set(held)]
    assert {tuple(split_documents(docs, 0.1, seed=s)[1]) for s in range(5)} != {tuple(held)}  # seed matters


def test_split_keeps_one_document_each_side():
    assert split_documents(["a", "b"], 0.01, seed=0)[0] and split_documents(["a", "b"], 0.01, seed=0)[1]
    train, held = split_documents(["a", "b", "c"], 0.99, seed=0)
    assert len(train) == 1 and len(held) == 2


def test_split_single_document_at_paragraph_boundary():
    paras = [f"paragraph {i} " + "x" * 40 for i in range(10)]
    text = "\n\n".join(paras)
    for fraction in (0.05, 0.3, 0.5, 0.95):
        (train,), (held,) = split_documents([text], fraction, seed=0)
        assert train + held == text
        k = paras.index(held.split("\n\n")[0])                          # held-out starts at a paragraph
        assert held == "\n\n".join(paras[k:])
        starts = [len("\n\n".join(paras[:j])) + 2 for j in range(1, 10)]
        target = len(text) * (1 - fraction)
        assert abs(len(train) - target) == min(abs(s - target) for s in starts)
    assert split_documents([text], 0.5, seed=0) == split_documents([text], 0.5, seed=99)


def test_split_single_document_fallbacks():
    (train,), (held,) = split_documents(["line one\nline two\nline three\nline four"], 0.5, seed=0)
    assert (train, held) == ("line one\nline two\n", "line three\nline four")
    (train,), (held,) = split_documents(["abcdefghij"], 0.3, seed=0)
    assert (train, held) == ("abcdefg", "hij")
    (train,), (held,) = split_documents(["\n\nab\n\n"], 0.999, seed=0)          # both sides keep text
    assert train.strip() and held.strip() and train + held == "\n\nab\n\n"


@pytest.mark.parametrize("docs, fraction, match", [
    (["a", "b"], 0.0, r"heldout_fraction: expected a value in \(0, 1\)"),
    (["a", "b"], 1.0, r"heldout_fraction: expected a value in \(0, 1\)"),
    ([], 0.1, "at least one document"),
    (["a"], 0.5, "cannot be cut into two non-empty parts"),
    (["  a \n\n"], 0.5, "cannot be cut"),
])
def test_split_errors(docs, fraction, match):
    with pytest.raises(ValueError, match=match):
        split_documents(docs, fraction, seed=0)


# ------------------------------------------------------------------------------------------------ pack
def test_pack_eos_between_documents_and_remainder_dropped():
    docs = ["hello", "wörld", "", "xyz!"]
    stream = list(b"hello") + [257] + list("wörld".encode()) + [257, 257] + list(b"xyz!")   # 18 tokens
    for T in (2, 3, 7, 18):
        out = pack(docs, ByteTokenizer(), T)
        n = len(stream) // T
        assert out.dtype == torch.long and out.shape == (n, T)
        assert out.flatten().tolist() == stream[:n * T]


def test_pack_with_bpe():
    docs = ["the cat sat on the mat. " * 20, "a dog ran in the fog. " * 20]
    tok = BPETokenizer.train(docs, 300)
    a, b = tok.encode(docs[0]), tok.encode(docs[1])
    out = pack(docs, tok, 16)
    assert out.flatten().tolist() == (a + [tok.eos_id] + b)[:out.numel()]
    assert out.numel() > len(a) + len(b) + 1 - 16


def test_pack_errors(tmp_path):
    with pytest.raises(ValueError, match=r"has 11 tokens but one sequence needs seq_len = 12"):
        pack(["hello", "world"], ByteTokenizer(), 12)
    with pytest.raises(ValueError, match="seq_len: expected an int >= 2"):
        pack(["hello"], ByteTokenizer(), 1)
    with pytest.raises(ValueError, match="at least one document"):
        pack([], ByteTokenizer(), 4)

    class NoEos(ByteTokenizer):
        eos_id = None
    with pytest.raises(ValueError, match="no eos token"):
        pack(["hello"], NoEos(), 2)


# ------------------------------------------------------------------------------------------------ batches
def tokens(n, T=3):
    return torch.arange(n * T).view(n, T)


def take(batches, k):
    return [next(batches) for _ in range(k)]


def test_batches_values_and_epochs_cover_every_row_once():
    data = tokens(10)
    b = Batches(data, 3, seed=0, drop_last=False)
    assert b.steps_per_epoch == 4
    orders = []
    for _ in range(3):
        batch = take(b, 4)
        assert [len(i) for i, _ in batch] == [3, 3, 3, 1]
        for idx, ids in batch:
            assert ids.dtype == torch.long and torch.equal(ids, data[idx])
        order = torch.cat([i for i, _ in batch]).tolist()
        assert sorted(order) == list(range(10))
        orders.append(order)
    assert len({tuple(o) for o in orders}) == 3                                   # reshuffled every epoch


def test_batches_drop_last_and_no_shuffle():
    b = Batches(tokens(10), 3, seed=0)
    assert b.steps_per_epoch == 3
    idx = torch.cat([i for i, _ in take(b, 3)]).tolist()
    assert len(idx) == len(set(idx)) == 9
    plain = Batches(tokens(10), 4, seed=0, shuffle=False, drop_last=False)
    assert [i.tolist() for i, _ in take(plain, 4)] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9], [0, 1, 2, 3]]
    assert Batches(tokens(5), 5, seed=0).steps_per_epoch == 1


def test_batches_deterministic_and_independent_of_global_rng():
    torch.manual_seed(0)
    rng = torch.get_rng_state()
    a = [i.tolist() for i, _ in take(Batches(tokens(17), 4, seed=7), 12)]
    assert torch.equal(torch.get_rng_state(), rng)
    torch.manual_seed(123)
    assert a == [i.tolist() for i, _ in take(Batches(tokens(17), 4, seed=7), 12)]
    assert a != [i.tolist() for i, _ in take(Batches(tokens(17), 4, seed=8), 12)]


@pytest.mark.parametrize("stop", [0, 1, 5, 8, 11])                          # mid-epoch and at epoch ends
@pytest.mark.parametrize("drop_last", [True, False])
def test_batches_resume_continues_exactly(stop, drop_last):
    data = tokens(17)
    ref = Batches(data, 4, seed=5, drop_last=drop_last)
    expected = take(ref, stop + 9)[stop:]
    run = Batches(data, 4, seed=5, drop_last=drop_last)
    take(run, stop)
    state = json.loads(json.dumps(run.state_dict()))
    resumed = Batches(data, 4, seed=999, drop_last=drop_last)                   # the state's seed wins
    resumed.load_state_dict(state)
    for (ei, ex), (gi, gx) in zip(expected, take(resumed, 9)):
        assert torch.equal(ei, gi) and torch.equal(ex, gx)
    assert resumed.state_dict() == ref.state_dict()


def test_batches_state_refused():
    b = Batches(tokens(10), 3, seed=0)
    state = b.state_dict()
    with pytest.raises(ValueError, match="num_sequences = 10, this dataset has num_sequences = 11"):
        Batches(tokens(11), 3, seed=0).load_state_dict(state)
    with pytest.raises(ValueError, match="batch_size = 3"):
        Batches(tokens(10), 2, seed=0).load_state_dict(state)
    with pytest.raises(ValueError, match="shuffle = True"):
        Batches(tokens(10), 3, seed=0, shuffle=False).load_state_dict(state)
    with pytest.raises(ValueError, match=r"0 <= position < 3"):
        b.load_state_dict({**state, "position": 3})
    with pytest.raises(ValueError, match="epoch >= 0"):
        b.load_state_dict({**state, "epoch": -1})
    with pytest.raises(ValueError, match="expected a dict with epoch"):
        b.load_state_dict({"epoch": 0})


@pytest.mark.parametrize("data, batch_size, match", [
    (tokens(4), 5, r"batch_size: expected an int in \[1, N = 4\]"),
    (tokens(4), 0, r"batch_size: expected an int in \[1, N = 4\]"),
    (tokens(4).float(), 2, r"integer tensor \[N, T\], got torch.float32"),
    (torch.arange(8), 2, r"integer tensor \[N, T\], got torch.int64 \(8,\)"),
    ([[1, 2]], 1, r"integer tensor \[N, T\], got list"),
])
def test_batches_bad_input(data, batch_size, match):
    with pytest.raises(ValueError, match=match):
        Batches(data, batch_size, seed=0)
