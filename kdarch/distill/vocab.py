"""Vocabulary identity: teacher and student must share a tokenizer, though their embedding tables may differ
by padding rows (151,936 vs 152,064 in Qwen-style checkpoints).

A fingerprint hashes the token → id map itself (not a serialisation of the tokenizer), so two tokenizers
with the same vocabulary match whatever their file layout or normaliser flags, and any re-numbering or
extra real token changes it.

Alignment (`align_vocab` -> `VocabAlignment`) is the one rule every teacher applies to its signal: equal
fingerprints (or an unknown one plus the caller's `n_real_tokens`) with the real ids below min(V_t, V_s) mean the
tables differ only by padding rows, so the teacher's logits are cut to the shared size and padded with -inf up
to the student's; anything else with different fingerprints is `VocabMismatchError`. Padding rows carry no
meaning, so dropping them (or giving them zero teacher probability) loses nothing the student could learn.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from kdarch.checks import int_arg
from kdarch.distill.teacher_signal import TopKTeacher


def vocab_fingerprint(token_to_id: dict[str, int]) -> str:
    """sha256 of the token → id map (sorted by id), as "sha256:<hex>"."""
    if not token_to_id:
        raise ValueError("vocab_fingerprint: expected a non-empty token -> id map")
    pairs = sorted(((int(i), str(t)) for t, i in token_to_id.items()))
    blob = json.dumps(pairs, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    return "sha256:" + hashlib.sha256(blob).hexdigest()


def tokenizer_fingerprint(path: str | os.PathLike) -> str | None:
    """The vocabulary fingerprint of a Hugging Face `tokenizer.json` (a file, or a directory holding one);
    None when there is none."""
    path = Path(path)
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        return None
    from tokenizers import Tokenizer

    try:
        vocab = Tokenizer.from_file(str(file)).get_vocab(with_added_tokens=True)
    except Exception as e:  # tokenizers raises its own exception type for malformed files
        raise ValueError(f"{file}: not a readable tokenizer.json ({e})") from None
    return vocab_fingerprint(vocab)


# ---------------------------------------------------------------------------------------------------- alignment
class VocabMismatchError(ValueError):
    """Teacher and student tokenize differently: no slicing or padding can make their distributions comparable."""


@dataclass(frozen=True)
class VocabAlignment:
    """How a teacher's signal over V_t ids becomes one over the student's V_s ids; built by `align_vocab`.

    Dense logits [..., V_t] are cut to min(V_t, V_s) and, when V_t < V_s, padded with -inf (zero teacher
    probability on the student's padding rows). A top-k signal keeps its ids < V_s; entries on ids >= V_s
    (teacher padding rows) leave the top-k and their probability joins the tail bucket. Rows must keep equal k,
    so every row drops as many entries as the row that drops the most, its lowest-valued ids first: each row
    stays an exact "some ids + tail" description of the teacher, only with less detail.
    """
    teacher_vocab_size: int
    """V_t: the last dimension of the teacher's logits."""
    student_vocab_size: int
    """V_s: the last dimension of the aligned signal's logits (the student's output head)."""

    def apply(self, signal: torch.Tensor | TopKTeacher) -> torch.Tensor | TopKTeacher:
        """The signal over the student's vocabulary: dense logits [..., V_s], or a `TopKTeacher` with ids < V_s."""
        Vt, Vs = self.teacher_vocab_size, self.student_vocab_size
        if isinstance(signal, TopKTeacher):
            return signal if Vt <= Vs else _drop_ids_from(signal, Vs)
        if not isinstance(signal, torch.Tensor) or signal.dim() < 1 or signal.shape[-1] != Vt:
            got = f"shape {tuple(signal.shape)}" if isinstance(signal, torch.Tensor) else type(signal).__name__
            raise ValueError(f"VocabAlignment: expected teacher logits [..., {Vt}] or a TopKTeacher, got {got}")
        if Vt >= Vs:
            return signal[..., :Vs]
        return torch.nn.functional.pad(signal, (0, Vs - Vt), value=float("-inf"))


def align_vocab(teacher_vocab_size: int, student_vocab_size: int | None = None, *,
                teacher_fingerprint: str | None = None, student_fingerprint: str | None = None,
                n_real_tokens: int | None = None) -> VocabAlignment:
    """The one rule for pairing a teacher's vocabulary with a student's (None student size: keep the teacher's).

    Fingerprints that are both known and differ are a real tokenizer mismatch: `VocabMismatchError`, naming
    both sizes and fingerprints. Otherwise equal sizes need nothing. Sizes that differ are accepted as padding
    rows when the fingerprints are equal, or, with a fingerprint unknown, when the caller vouches for the shared
    tokenizer by giving `n_real_tokens` (the real ids are 0 .. n_real_tokens - 1); the real ids must fit in
    both tables (n_real_tokens <= min(V_t, V_s)).
    """
    Vt = int_arg("teacher_vocab_size", teacher_vocab_size, min=1)
    Vs = Vt if student_vocab_size is None else int_arg("student_vocab_size", student_vocab_size, min=1)
    if n_real_tokens is not None:
        int_arg("n_real_tokens", n_real_tokens, min=1)
    ft, fs = teacher_fingerprint, student_fingerprint
    if ft is not None and fs is not None and ft != fs:
        raise VocabMismatchError(f"teacher and student tokenizers differ: teacher V={Vt} fingerprint {ft}, student "
                                 f"V={Vs} fingerprint {fs}; distillation from logits needs one shared tokenizer, or a "
                                 'cross-tokenizer loss: distill.cross_tokenizer = "uld" or "align"')
    if n_real_tokens is not None and n_real_tokens > min(Vt, Vs):
        raise VocabMismatchError(f"n_real_tokens={n_real_tokens} real tokens do not fit in both vocabularies: teacher "
                                 f"V={Vt} (fingerprint {ft}), student V={Vs} (fingerprint {fs})")
    if Vt != Vs and (ft is None or fs is None) and n_real_tokens is None:
        raise VocabMismatchError(f"teacher V={Vt} (fingerprint {ft}) and student V={Vs} (fingerprint {fs}) differ and "
                                 f"a tokenizer fingerprint is unknown: pass n_real_tokens (how many real tokens the "
                                 f"shared tokenizer has) to treat the difference as padding rows")
    return VocabAlignment(Vt, Vs)


def _drop_ids_from(tk: TopKTeacher, V: int) -> TopKTeacher:
    """`tk` without its entries on ids >= V, their probability moved into the tail (see VocabAlignment)."""
    bad = tk.ids >= V
    if not bad.any():
        return tk
    n_drop = int(bad.sum(-1).max())
    if n_drop == tk.k:
        raise ValueError(f"VocabAlignment: a row's whole top-{tk.k} lies on teacher padding ids >= {V}; the teacher "
                         f"puts its mass on ids the student does not have")
    key = tk.values.double().masked_fill(bad, float("-inf"))
    keep = key.argsort(dim=-1, descending=True, stable=True)[..., :tk.k - n_drop]
    ids, values = tk.ids.gather(-1, keep), tk.values.gather(-1, keep)
    tail = tk.tail_mass
    if tail is not None:  # tail' = tail + the probability of the entries left out
        v = tk.values.double()
        p = v.exp() if tk.values_are == "logprobs" else v.softmax(-1) * (1 - tail.double())[..., None]
        left_out = p.sum(-1) - p.gather(-1, keep).sum(-1)
        tail = (tail.double() + left_out).clamp(0, 1).to(tail.dtype)
    return dataclasses.replace(tk, ids=ids, values=values, tail_mass=tail)  # log-probs alone: tail re-derived
