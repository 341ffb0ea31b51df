"""Tokenizers for the train script: raw bytes, or a byte-level BPE run by Hugging Face `tokenizers`.

Why byte-level everywhere: every string maps to UTF-8 bytes and back, so any text round-trips exactly and
there is no unknown token. `ByteTokenizer` is the zero-training baseline (ids 0..255 are the byte values);
`BPETokenizer` learns merges on the corpus so a sequence of the same length holds ~3-4x more text.

Both save the Hugging Face format (`tokenizer.json` + `tokenizer_config.json`), so a saved tokenizer loads
in `tokenizers.Tokenizer.from_file`, `transformers.PreTrainedTokenizerFast(tokenizer_file=...)` and
`AutoTokenizer.from_pretrained(dir)`, and `load_tokenizer` reads any Hugging Face tokenizer.json back.

Conventions shared by every tokenizer here:
- `encode` never adds special tokens, and text that happens to spell a special token ("<|eos|>") is
  encoded as ordinary text: documents cannot inject control tokens, and decode(encode(s)) == s always.
  (Hugging Face's own encoders match special-token strings in raw text; on text without them the ids agree.)
- `decode` drops special tokens and refuses ids outside [0, vocab_size).
- `bos_id` / `eos_id` / `pad_id` are ints for kdarch's tokenizers (<|bos|>, <|eos|>, <|pad|>) and may be
  None for a foreign tokenizer that has no such token.
- `fingerprint` hashes the token -> id map (`kdarch.distill.vocab.vocab_fingerprint`): teachers and logit
  caches compare it to refuse a student trained on another vocabulary.
"""
from __future__ import annotations

import abc
import functools
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from kdarch.distill.vocab import vocab_fingerprint

SPECIAL_TOKENS = ("<|bos|>", "<|eos|>", "<|pad|>")
"""kdarch's special tokens, in id order (ids 0, 1, 2 in a trained BPE; 256, 257, 258 in ByteTokenizer)."""
TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"

# Names that foreign tokenizers use for their begin / end / padding tokens, most common first.
_BOS_NAMES = ("<|bos|>", "<s>", "<|begin_of_text|>", "<｜begin▁of▁sentence｜>", "<|startoftext|>", "<bos>")
_EOS_NAMES = ("<|eos|>", "</s>", "<|end_of_text|>", "<｜end▁of▁sentence｜>", "<|endoftext|>", "<eos>")
_PAD_NAMES = ("<|pad|>", "<pad>", "<|finetune_right_pad_id|>", "<｜▁pad▁｜>", "[PAD]")


@functools.cache
def byte_to_unicode() -> tuple[str, ...]:
    """The printable character standing for each byte in byte-level BPE vocabularies (the GPT-2 table):
    printable Latin-1 bytes stand for themselves, the other 68 take the code points from 256 upwards."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    extra = iter(range(256, 256 + 256 - len(printable)))
    return tuple(chr(b) if b in printable else chr(next(extra)) for b in range(256))


def _byte_level(tok: HFTokenizer) -> HFTokenizer:
    """Give a BPE model the byte-level pre-tokenizer and decoder (GPT-2 split regex, no prefix space)."""
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


class Tokenizer(abc.ABC):
    """The interface the train script uses; see the module docstring for the shared conventions."""
    bos_id: int | None
    eos_id: int | None
    pad_id: int | None

    @abc.abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without any special token."""

    @abc.abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`, special tokens dropped."""

    @abc.abstractmethod
    def get_vocab(self) -> dict[str, int]:
        """The token -> id map, special tokens included."""

    @abc.abstractmethod
    def to_hf(self) -> HFTokenizer:
        """This tokenizer as a Hugging Face `tokenizers.Tokenizer` (what `save` writes)."""

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int:
        """Number of embedding rows needed: 1 + the largest id."""

    def encode_batch(self, texts: Iterable[str]) -> list[list[int]]:
        """`encode` of each text (parallel where the engine allows)."""
        return [self.encode(t) for t in _check_texts(texts, "encode_batch")]

    @functools.cached_property
    def prefix_ids(self) -> list[int]:
        """The special ids this tokenizer puts before every text (a BOS from its post-processor), if any: what a
        model trained with it saw at the start of every sequence."""
        enc = self.to_hf().encode("", add_special_tokens=True)
        return [i for i, m in zip(enc.ids, enc.special_tokens_mask) if m]

    @functools.cached_property
    def fingerprint(self) -> str:
        """"sha256:<hex>" of the token -> id map, see `kdarch.distill.vocab.vocab_fingerprint`."""
        return vocab_fingerprint(self.get_vocab())

    def save(self, directory: str | os.PathLike) -> Path:
        """Write tokenizer.json and tokenizer_config.json (Hugging Face format) into `directory`; returns it."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        self.to_hf().save(str(out / TOKENIZER_FILE))
        names = {i: t for t, i in self.get_vocab().items()}
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False}
        for key in ("bos", "eos", "pad"):
            if (i := getattr(self, f"{key}_id")) is not None:
                config[f"{key}_token"] = names[i]
        (out / CONFIG_FILE).write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        return out

    def _check_ids(self, ids: Sequence[int]) -> list[int]:
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"{type(self).__name__}.decode: ids: expected a value in [0, {self.vocab_size}), got "
                             f"{bad[:5]}")
        return ids

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(vocab_size={self.vocab_size}, bos_id={self.bos_id}, eos_id={self.eos_id}, "
                f"pad_id={self.pad_id})")


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as ids 0..255, then <|bos|> = 256, <|eos|> = 257, <|pad|> = 258 (vocab_size 259).
    Decoding invalid UTF-8 (e.g. a sampled half character) gives U+FFFD instead of failing."""
    bos_id, eos_id, pad_id = 256, 257, 258

    @property
    def vocab_size(self) -> int:
        return 256 + len(SPECIAL_TOKENS)

    def encode(self, text: str) -> list[int]:
        _check_texts([text], "encode")
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(i for i in self._check_ids(ids) if i < 256).decode("utf-8", errors="replace")

    def get_vocab(self) -> dict[str, int]:
        return {**{c: b for b, c in enumerate(byte_to_unicode())}, **{t: 256 + i for i, t in enumerate(SPECIAL_TOKENS)}}

    def to_hf(self) -> HFTokenizer:
        """A byte-level BPE without merges: every byte is one token with id = its value."""
        tok = _byte_level(HFTokenizer(models.BPE(vocab={c: b for b, c in enumerate(byte_to_unicode())}, merges=[])))
        tok.add_special_tokens(list(SPECIAL_TOKENS))
        return tok


class BPETokenizer(Tokenizer):
    """A Hugging Face `tokenizers.Tokenizer` behind the kdarch interface: one trained here by `train`
    (byte-level BPE, <|bos|> = 0, <|eos|> = 1, <|pad|> = 2, then the 256 bytes, then merges) or any
    tokenizer.json loaded by `load_tokenizer`. Sets `tok.encode_special_tokens = True` (module docstring)."""

    def __init__(self, tok: HFTokenizer, *, bos_id: int | None, eos_id: int | None, pad_id: int | None = None):
        if not isinstance(tok, HFTokenizer):
            raise TypeError(f"BPETokenizer: expected a tokenizers.Tokenizer, got {type(tok).__name__}")
        self._tok = tok
        self._tok.encode_special_tokens = True  # special-token strings in text stay text (see module docstring)
        vocab = tok.get_vocab(with_added_tokens=True)
        if not vocab:
            raise ValueError("BPETokenizer: the tokenizer has an empty vocabulary")
        self._vocab_size = max(vocab.values()) + 1
        self._special = {t.content for t in tok.get_added_tokens_decoder().values() if t.special}
        for key, i in (("bos_id", bos_id), ("eos_id", eos_id), ("pad_id", pad_id)):
            if i is not None and not 0 <= i < self._vocab_size:
                raise ValueError(f"BPETokenizer: {key}: expected a value in [0, {self._vocab_size}) or None, got {i}")
        self.bos_id, self.eos_id, self.pad_id = bos_id, eos_id, pad_id

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, *, min_frequency: int = 2) -> BPETokenizer:
        """Learn a byte-level BPE of at most `vocab_size` tokens (fewer when the corpus runs out of pairs
        seen `min_frequency` times). The same texts and arguments give the same vocabulary and merges."""
        floor = 256 + len(SPECIAL_TOKENS)
        if not isinstance(vocab_size, int) or vocab_size < floor:
            raise ValueError(f"BPETokenizer.train: vocab_size: expected an int >= {floor} (3 special tokens + 256 "
                             f"bytes), got {vocab_size!r}")
        if not isinstance(min_frequency, int) or min_frequency < 1:
            raise ValueError(f"BPETokenizer.train: min_frequency: expected an int >= 1, got {min_frequency!r}")
        texts = _check_texts(texts, "BPETokenizer.train")
        if not any(texts):
            raise ValueError("BPETokenizer.train: expected at least one non-empty text")
        tok = _byte_level(HFTokenizer(models.BPE()))
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False,
                                      special_tokens=list(SPECIAL_TOKENS),
                                      initial_alphabet=list(byte_to_unicode()))
        tok.train_from_iterator(texts, trainer)
        return cls(tok, bos_id=0, eos_id=1, pad_id=2)

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    def encode(self, text: str) -> list[int]:
        _check_texts([text], "encode")
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Iterable[str]) -> list[list[int]]:
        texts = _check_texts(texts, "encode_batch")
        return [e.ids for e in self._tok.encode_batch_fast(texts, add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(self._check_ids(ids), skip_special_tokens=True)

    def get_vocab(self) -> dict[str, int]:
        return self._tok.get_vocab(with_added_tokens=True)

    def to_hf(self) -> HFTokenizer:
        return self._tok


def load_tokenizer(spec: str | os.PathLike) -> Tokenizer:
    """"bytes" -> ByteTokenizer; a directory holding tokenizer.json, or a tokenizer.json path -> the
    tokenizer saved there (kdarch's or any Hugging Face one). bos / eos / pad come from a
    tokenizer_config.json beside the file when it names them, else from the usual special-token names."""
    if isinstance(spec, str) and spec == "bytes":
        return ByteTokenizer()
    if not isinstance(spec, (str, os.PathLike)):
        raise TypeError(f"load_tokenizer: expected 'bytes' or a path, got {type(spec).__name__}")
    path = Path(spec)
    if path.is_dir():
        path = path / TOKENIZER_FILE
        if not path.is_file():
            raise FileNotFoundError(f"load_tokenizer: no {TOKENIZER_FILE} in directory {spec} (expected a directory "
                                    f"written by Tokenizer.save or a Hugging Face tokenizer directory)")
    elif not path.is_file():
        raise FileNotFoundError(f"load_tokenizer: expected 'bytes', a directory holding {TOKENIZER_FILE} or a "
                                f"path to a {TOKENIZER_FILE}; {str(spec)!r} does not exist")
    try:
        tok = HFTokenizer.from_file(str(path))
    except Exception as e:  # the Rust side raises a bare Exception with a serde message
        raise ValueError(f"load_tokenizer: {path} is not a Hugging Face tokenizer.json ({e})") from None
    vocab = tok.get_vocab(with_added_tokens=True)
    if vocab == ByteTokenizer().get_vocab() and not json.loads(tok.to_str())["model"].get("merges"):
        return ByteTokenizer()
    names = _config_token_names(path.parent / CONFIG_FILE)
    special = [t.content for _, t in sorted(tok.get_added_tokens_decoder().items()) if t.special]

    def find(key: str, candidates: tuple[str, ...]) -> int | None:
        if names.get(key) in vocab:
            return vocab[names[key]]
        return next((vocab[t] for t in candidates if t in special), None)

    return BPETokenizer(tok, bos_id=find("bos", _BOS_NAMES), eos_id=find("eos", _EOS_NAMES),
                        pad_id=find("pad", _PAD_NAMES))


def _config_token_names(path: Path) -> dict[str, str]:
    """{"bos": name, ...} from a tokenizer_config.json (entries may be strings or {"content": ...})."""
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"load_tokenizer: {path} is not valid JSON ({e})") from None
    out = {}
    for key in ("bos", "eos", "pad"):
        entry = config.get(f"{key}_token") if isinstance(config, dict) else None
        if isinstance(entry, dict):
            entry = entry.get("content")
        if isinstance(entry, str):
            out[key] = entry
    return out


def _check_texts(texts: Iterable[str], where: str) -> list[str]:
    if isinstance(texts, str):
        raise TypeError(f"{where}: expected an iterable of str, got a single str")
    texts = list(texts)
    bad = next((t for t in texts if not isinstance(t, str)), None)
    if bad is not None:
        raise TypeError(f"{where}: expected str texts, got {type(bad).__name__}")
    return texts
