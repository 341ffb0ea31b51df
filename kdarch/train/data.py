"""Documents -> held-out split -> packed token sequences -> resumable shuffled batches.

Why this shape: the train script's runs are short and must resume exactly, so everything here is a
deterministic function of its inputs and a seed. Splitting happens on documents, before tokenization, so
no held-out text is ever trained on; packing joins documents with eos and cuts fixed-length rows, so no
token is padding; `Batches` derives each epoch's order from (seed, epoch) alone, so a checkpoint needs
only four integers to continue with exactly the next batch.

Document sources (`load_documents`):
- "embedded": the pydoc topic help shipped with every Python, one document per topic, sorted by key;
- a .txt file: ONE document (the whole file); a directory: one document per .txt file under it,
  recursively, in sorted path order;
- a .jsonl file: one JSON object per non-blank line, its `field` (default "text") a string document.
Documents that are empty or whitespace only are dropped; files are read as UTF-8.

Shape legend: N packed sequences, T sequence length, B batch size.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from kdarch.checks import check, is_int
from kdarch.train.tokenizer import Tokenizer

_BOUNDARIES = (re.compile(r"\n[ \t]*\n\s*"), re.compile(r"\n"))  # paragraph, then line boundaries


def embedded_corpus() -> list[str]:
    """The pydoc topic help that ships with every Python (~80 documents, ~0.5-1.2 MB), sorted by topic."""
    from pydoc_data.topics import topics
    return [topics[k] for k in sorted(topics)]


def load_documents(spec: str | os.PathLike, *, field: str = "text") -> list[str]:
    """Documents from "embedded", a .txt file, a directory of .txt files or a .jsonl file (module docstring)."""
    if isinstance(spec, str) and spec == "embedded":
        return _nonempty(embedded_corpus(), "embedded")
    if not isinstance(spec, (str, os.PathLike)):
        raise TypeError(f"load_documents: expected 'embedded' or a path, got {type(spec).__name__}")
    path = Path(spec)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.txt") if p.is_file())
        if not files:
            raise ValueError(f"load_documents: directory {path} holds no .txt files")
        return _nonempty([_read(p) for p in files], str(path))
    if not path.is_file():
        raise FileNotFoundError(f"load_documents: expected 'embedded', a .txt or .jsonl file or a directory of "
                                f".txt files; {str(spec)!r} does not exist")
    if path.suffix == ".txt":
        return _nonempty([_read(path)], str(path))
    if path.suffix == ".jsonl":
        docs = []
        for n, line in enumerate(_read(path).splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"load_documents: {path} line {n} is not valid JSON ({e.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get(field), str):
                got = type(record.get(field)).__name__ if isinstance(record, dict) and field in record else "nothing"
                raise ValueError(f"load_documents: {path} line {n}: expected a JSON object with a string "
                                 f"field {field!r}, got {got}")
            docs.append(record[field])
        return _nonempty(docs, str(path))
    raise ValueError(f"load_documents: expected a .txt or .jsonl file, got {path.name!r}")


def split_documents(docs: Sequence[str], heldout_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """(train_docs, heldout_docs): round(heldout_fraction * len(docs)) documents drawn by `seed`, clamped to
    leave at least one on each side; both sides keep the corpus order. A corpus of ONE document is cut by
    characters instead: the held-out part is the end of the text, from the paragraph boundary nearest to
    (1 - heldout_fraction) of its length (a line boundary if it has no paragraphs; a character position if
    it has no newline either); `seed` plays no part there."""
    if not isinstance(heldout_fraction, (int, float)) or not 0 < heldout_fraction < 1:
        raise ValueError(f"split_documents: heldout_fraction: expected a value in (0, 1), got {heldout_fraction!r}")
    if not isinstance(seed, int):
        raise ValueError(f"split_documents: seed: expected an int, got {seed!r}")
    docs = list(docs)
    if not docs:
        raise ValueError("split_documents: expected at least one document, got none")
    if len(docs) == 1:
        return _split_text(docs[0], heldout_fraction)
    n_held = min(max(round(heldout_fraction * len(docs)), 1), len(docs) - 1)
    perm = torch.randperm(len(docs), generator=torch.Generator().manual_seed(_mix(seed)))
    held = set(perm[:n_held].tolist())
    return ([d for i, d in enumerate(docs) if i not in held], [d for i, d in enumerate(docs) if i in held])


def pack(docs: Sequence[str], tokenizer: Tokenizer, seq_len: int) -> torch.Tensor:
    """[N, seq_len] int64: the documents encoded, joined with eos between them, cut into consecutive
    non-overlapping rows; the last len % seq_len tokens are dropped. A tokenizer that begins every text with
    special tokens of its own (`prefix_ids`, a BOS) gets them at the start of every row, as its models expect."""
    if not isinstance(seq_len, int) or seq_len < 2:
        raise ValueError(f"pack: seq_len: expected an int >= 2 (an input and its next-token target), got {seq_len!r}")
    if tokenizer.eos_id is None:
        raise ValueError(f"pack: the tokenizer has no eos token to join documents with ({tokenizer!r})")
    docs = list(docs)
    if not docs:
        raise ValueError("pack: expected at least one document, got none")
    stream: list[int] = []
    for i, ids in enumerate(tokenizer.encode_batch(docs)):
        if i:
            stream.append(tokenizer.eos_id)
        stream.extend(ids)
    prefix = tokenizer.prefix_ids
    width = seq_len - len(prefix)
    if width < 1 or len(stream) < width:
        raise ValueError(f"pack: the corpus has {len(stream)} tokens but one sequence needs seq_len = {seq_len}"
                         f"{f' ({len(prefix)} of them the tokenizer prefix)' if prefix else ''}; use more text or a "
                         f"shorter seq_len")
    n = len(stream) // width
    rows_NW = torch.tensor(stream[:n * width], dtype=torch.long).view(n, width)
    return torch.cat([torch.tensor(prefix, dtype=torch.long).expand(n, -1), rows_NW], 1) if prefix else rows_NW


class Batches(Iterator[tuple[torch.Tensor, torch.Tensor]]):
    """Endless batches over the rows of `tokens_NT`, epoch after epoch, yielding (indices_B, input_ids_BT).

    Epoch e visits the rows in a permutation drawn from a local generator seeded by (seed, e) (or in order
    when shuffle=False), in `steps_per_epoch` batches; drop_last=True skips the last incomplete batch (other
    rows each epoch when shuffled), drop_last=False yields it short. `state_dict()` is the epoch and
    position (batches already taken in it) of the next batch, plus what they mean: seed, N, batch_size.
    """

    def __init__(self, tokens_NT: torch.Tensor, batch_size: int, *, seed: int, shuffle: bool = True,
                 drop_last: bool = True):
        if not isinstance(tokens_NT, torch.Tensor) or tokens_NT.dim() != 2 or tokens_NT.is_floating_point() \
                or tokens_NT.is_complex() or tokens_NT.dtype == torch.bool:
            got = f"{tokens_NT.dtype} {tuple(tokens_NT.shape)}" if isinstance(tokens_NT, torch.Tensor) \
                else type(tokens_NT).__name__
            raise ValueError(f"Batches: tokens_NT: expected an integer tensor [N, T], got {got}")
        n = tokens_NT.shape[0]
        if not isinstance(batch_size, int) or not 1 <= batch_size <= n:
            raise ValueError(f"Batches: batch_size: expected an int in [1, N = {n}] (N packed sequences), "
                             f"got {batch_size!r}")
        if not isinstance(seed, int):
            raise ValueError(f"Batches: seed: expected an int, got {seed!r}")
        self.tokens_NT, self.batch_size, self.seed = tokens_NT, batch_size, seed
        self.shuffle, self.drop_last = bool(shuffle), bool(drop_last)
        self.epoch, self.position = 0, 0
        self._order: tuple[int, torch.Tensor] | None = None  # (epoch, its row order), cached

    @property
    def num_sequences(self) -> int:
        return self.tokens_NT.shape[0]

    @property
    def steps_per_epoch(self) -> int:
        n, b = self.num_sequences, self.batch_size
        return n // b if self.drop_last else math.ceil(n / b)

    def epoch_order(self, epoch: int) -> torch.Tensor:
        """[N] the row order of `epoch`: a permutation drawn from (seed, epoch), or 0..N-1 unshuffled."""
        if not self.shuffle:
            return torch.arange(self.num_sequences)
        return torch.randperm(self.num_sequences, generator=torch.Generator().manual_seed(_mix(self.seed, epoch)))

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._order is None or self._order[0] != self.epoch:
            self._order = (self.epoch, self.epoch_order(self.epoch))
        start = self.position * self.batch_size
        indices_B = self._order[1][start:start + self.batch_size]
        self.position += 1
        if self.position == self.steps_per_epoch:
            self.epoch, self.position = self.epoch + 1, 0
        return indices_B, self.tokens_NT[indices_B].long()

    def state_dict(self) -> dict[str, int | bool]:
        """JSON-serialisable position of the next batch."""
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                "num_sequences": self.num_sequences, "batch_size": self.batch_size,
                "shuffle": self.shuffle, "drop_last": self.drop_last}

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state` (its seed included); refuses a state made for another dataset or batching."""
        if not isinstance(state, dict) or not {"epoch", "position", "seed", "num_sequences"} <= state.keys():
            raise ValueError("Batches.load_state_dict: expected a dict with epoch, position, seed and "
                             f"num_sequences, got {state!r}")
        for key in ("num_sequences", "batch_size", "shuffle", "drop_last"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(f"Batches.load_state_dict: the state was made for {key} = {state[key]!r}, this "
                                 f"dataset has {key} = {getattr(self, key)!r}")
        epoch, position, seed = state["epoch"], state["position"], state["seed"]
        check(all(is_int(v) for v in (epoch, position, seed)) and epoch >= 0
              and 0 <= position < self.steps_per_epoch, "Batches.load_state_dict: state",
              f"ints epoch >= 0, 0 <= position < {self.steps_per_epoch} and seed", state)
        self.epoch, self.position, self.seed, self._order = epoch, position, seed, None


def _mix(*values: int) -> int:
    """A 64-bit generator seed from integers, so that (seed, epoch) pairs never share a stream by accident."""
    return int.from_bytes(hashlib.blake2b(repr(values).encode(), digest_size=8).digest(), "little")


def _split_text(text: str, heldout_fraction: float) -> tuple[list[str], list[str]]:
    lo, hi = len(text) - len(text.lstrip()), len(text.rstrip())  # a cut c leaves text on both sides iff lo < c < hi
    if hi - lo < 2:
        raise ValueError(f"split_documents: a single document of {len(text)} characters cannot be cut into two "
                         f"non-empty parts; give more text or more documents")
    target = round(len(text) * (1 - heldout_fraction))
    for pattern in _BOUNDARIES:
        cut = min((m.end() for m in pattern.finditer(text, lo, hi) if lo < m.end() < hi),
                  key=lambda c: (abs(c - target), c), default=None)
        if cut is not None:
            return [text[:cut]], [text[cut:]]
    cut = min(max(target, lo + 1), hi - 1)
    return [text[:cut]], [text[cut:]]


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"load_documents: {path} is not UTF-8 text ({e})") from None


def _nonempty(docs: list[str], source: str) -> list[str]:
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise ValueError(f"load_documents: {source} holds no non-empty document")
    return docs
