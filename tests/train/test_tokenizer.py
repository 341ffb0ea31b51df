"""Tokenizers: exact round trips, ids checked against UTF-8 bytes, BPE training determinism and size,
special-token ids, save/load through kdarch, `tokenizers` and transformers, foreign tokenizer.json files
and bad input. One BPE is trained per module on the embedded corpus (~0.2 s)."""
import json
import re

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers

from kdarch.train.data import embedded_corpus
from kdarch.train.tokenizer import SPECIAL_TOKENS, BPETokenizer, ByteTokenizer, load_tokenizer

TRICKY = ["", "plain ascii", "héllo wörld — ≠ ∑", "日本語のテキスト", "emoji 🎉👩‍💻 and \u0000 nul",
          "tabs\tand\r\nwindows\nnewlines  \n\n  ", "a literal <|eos|> and <|bos|> in text", " leading space"]


@pytest.fixture(scope="module")
def corpus():
    return embedded_corpus()


@pytest.fixture(scope="module")
def bpe(corpus):
    return BPETokenizer.train(corpus, 2048)


# ------------------------------------------------------------------------------------------------ bytes
def test_byte_ids_are_utf8_bytes_and_round_trip():
    tok = ByteTokenizer()
    for s in TRICKY:
        assert tok.encode(s) == list(s.encode("utf-8"))
        assert tok.decode(tok.encode(s)) == s
    assert tok.encode_batch(TRICKY) == [list(s.encode("utf-8")) for s in TRICKY]


def test_byte_special_ids_and_decode():
    tok = ByteTokenizer()
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (256, 257, 258, 259)
    vocab = tok.get_vocab()
    assert len(vocab) == 259 and sorted(vocab.values()) == list(range(259))
    assert [vocab[t] for t in SPECIAL_TOKENS] == [256, 257, 258]
    assert tok.decode([256, 104, 105, 257, 258]) == "hi"                   # specials dropped
    half = list("é".encode())[:1] + list(b"ok")                             # a cut character
    assert tok.decode(half) == bytes(half).decode("utf-8", errors="replace") == "\ufffdok"


# ------------------------------------------------------------------------------------------------ BPE
def test_bpe_round_trip_on_corpus_sample_and_tricky_text(bpe, corpus):
    sample = corpus[:: max(1, len(corpus) // 8)] + TRICKY
    for s in sample:
        assert bpe.decode(bpe.encode(s)) == s
    assert bpe.encode_batch(sample) == [bpe.encode(s) for s in sample]
    # merges are used: the corpus needs far fewer tokens than bytes
    n_tok, n_bytes = sum(map(len, bpe.encode_batch(corpus))), sum(len(d.encode()) for d in corpus)
    assert n_tok < 0.5 * n_bytes


def test_bpe_special_ids_and_literal_special_text(bpe):
    assert (bpe.bos_id, bpe.eos_id, bpe.pad_id) == (0, 1, 2)
    vocab = bpe.get_vocab()
    assert [vocab[t] for t in SPECIAL_TOKENS] == [0, 1, 2]
    assert sorted(vocab.values())[:259] == list(range(259))                 # specials then all 256 bytes
    ids = bpe.encode("say <|eos|> now")
    assert not {0, 1, 2} & set(ids)                                         # text never becomes a control token
    assert bpe.decode([0] + bpe.encode("hi") + [1, 2]) == "hi"


def test_bpe_training_is_deterministic_and_respects_vocab_size(bpe, corpus):
    again = BPETokenizer.train(list(corpus), 2048)
    assert again.fingerprint == bpe.fingerprint
    assert again.to_hf().to_str() == bpe.to_hf().to_str()                   # same merges in the same order
    assert bpe.vocab_size == len(bpe.get_vocab()) == 2048
    small = BPETokenizer.train(corpus[:5], 300)
    assert small.vocab_size == len(small.get_vocab()) == 300
    assert small.fingerprint != bpe.fingerprint != ByteTokenizer().fingerprint
    tiny = BPETokenizer.train(["abab"], 5000)                               # runs out of frequent pairs
    assert 259 <= tiny.vocab_size < 5000


def test_fingerprint_format_and_sensitivity(bpe):
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", bpe.fingerprint)
    assert BPETokenizer.train(embedded_corpus(), 2047).fingerprint != bpe.fingerprint
    renumbered = json.loads(bpe.to_hf().to_str())                           # swap two ids: same tokens, other map
    vocab = renumbered["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[300:302]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    other = BPETokenizer(HFTokenizer.from_str(json.dumps(renumbered)), bos_id=0, eos_id=1, pad_id=2)
    assert other.fingerprint != bpe.fingerprint


# ------------------------------------------------------------------------------------------------ save / load
def test_save_load_same_fingerprint_and_encodings(bpe, corpus, tmp_path):
    out = bpe.save(tmp_path / "tok")
    for spec in (out, out / "tokenizer.json", str(out)):
        loaded = load_tokenizer(spec)
        assert isinstance(loaded, BPETokenizer)
        assert loaded.fingerprint == bpe.fingerprint
        assert (loaded.bos_id, loaded.eos_id, loaded.pad_id, loaded.vocab_size) == (0, 1, 2, 2048)
        assert loaded.encode_batch(corpus[:10] + TRICKY) == bpe.encode_batch(corpus[:10] + TRICKY)
    plain = HFTokenizer.from_file(str(out / "tokenizer.json"))
    assert [plain.encode(s, add_special_tokens=False).ids for s in corpus[:10]] == bpe.encode_batch(corpus[:10])


def test_transformers_reads_saved_files(bpe, corpus, tmp_path):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast
    out = bpe.save(tmp_path / "tok")
    fast = PreTrainedTokenizerFast(tokenizer_file=str(out / "tokenizer.json"))
    texts = corpus[:10] + [t for t in TRICKY if "<|" not in t]
    for s in texts:
        ids = bpe.encode(s)
        assert fast.encode(s, add_special_tokens=False) == ids
        assert fast.decode(ids) == s
    auto = AutoTokenizer.from_pretrained(str(out))
    assert (auto.bos_token_id, auto.eos_token_id, auto.pad_token_id) == (0, 1, 2)
    assert auto.encode(corpus[0], add_special_tokens=False) == bpe.encode(corpus[0])


def test_byte_tokenizer_save_load_and_transformers(tmp_path):
    from transformers import PreTrainedTokenizerFast
    tok = ByteTokenizer()
    out = tok.save(tmp_path / "bytes")
    loaded = load_tokenizer(out)
    assert isinstance(loaded, ByteTokenizer) and loaded.fingerprint == tok.fingerprint
    assert load_tokenizer("bytes").fingerprint == tok.fingerprint
    fast = PreTrainedTokenizerFast(tokenizer_file=str(out / "tokenizer.json"))
    for s in TRICKY[:6]:
        assert fast.encode(s, add_special_tokens=False) == list(s.encode("utf-8"))
    assert fast.convert_tokens_to_ids(list(SPECIAL_TOKENS)) == [256, 257, 258]


def _foreign(tmp_path, specials, config=None):
    """A Hugging Face tokenizer.json that kdarch did not write (WordLevel, other special-token names)."""
    words = ["hello", "world", "[UNK]"]
    tok = HFTokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(specials)
    d = tmp_path / "foreign"
    d.mkdir()
    tok.save(str(d / "tokenizer.json"))
    if config is not None:
        (d / "tokenizer_config.json").write_text(json.dumps(config))
    return d


def test_foreign_tokenizer_special_tokens_found_by_name(tmp_path):
    tok = load_tokenizer(_foreign(tmp_path, ["<s>", "</s>", "<pad>"]))
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (3, 4, 5, 6)
    assert tok.encode("hello world") == [0, 1]


def test_foreign_tokenizer_config_names_win(tmp_path):
    d = _foreign(tmp_path, ["<s>", "</s>", "<|endoftext|>"],
                 config={"bos_token": {"content": "<s>"}, "eos_token": "<|endoftext|>", "pad_token": None})
    tok = load_tokenizer(d)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (3, 5, None)


def test_foreign_tokenizer_without_specials(tmp_path):
    tok = load_tokenizer(_foreign(tmp_path, []) / "tokenizer.json")
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (None, None, None)


# ------------------------------------------------------------------------------------------------ errors
def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="'bytes'.*does not exist"):
        load_tokenizer(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="no tokenizer.json in directory"):
        load_tokenizer(tmp_path)
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not a Hugging Face tokenizer.json"):
        load_tokenizer(bad)
    with pytest.raises(TypeError, match="expected 'bytes' or a path"):
        load_tokenizer(3)


def test_train_and_codec_errors(bpe):
    with pytest.raises(ValueError, match="vocab_size: expected an int >= 259"):
        BPETokenizer.train(["abc"], 258)
    with pytest.raises(ValueError, match="min_frequency: expected an int >= 1"):
        BPETokenizer.train(["abc"], 300, min_frequency=0)
    with pytest.raises(ValueError, match="at least one non-empty text"):
        BPETokenizer.train(["", ""], 300)
    with pytest.raises(TypeError, match="single str"):
        BPETokenizer.train("abc", 300)
    for tok in (bpe, ByteTokenizer()):
        with pytest.raises(TypeError, match="expected str"):
            tok.encode(b"bytes")
        with pytest.raises(TypeError, match="expected str"):
            tok.encode_batch(["ok", 3])
        with pytest.raises(ValueError, match=rf"ids: expected a value in \[0, {tok.vocab_size}\)"):
            tok.decode([5, tok.vocab_size])
        with pytest.raises(ValueError, match="ids: expected a value in"):
            tok.decode([-1])
    with pytest.raises(ValueError, match="eos_id: expected a value in"):
        BPETokenizer(bpe.to_hf(), bos_id=0, eos_id=99999)
