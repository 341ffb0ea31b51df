"""Distillation from a teacher with another tokenizer: byte-span alignment, the shared vocabulary, and two losses.

Logit distillation compares two distributions over the same next token. With two tokenizers neither the
positions nor the vocabularies agree, so both are brought onto the text itself, as bytes:

- Alignment. The student's row is laid out as a byte stream (each text token its UTF-8 bytes, each special
  token one unit of its own) and the teacher re-tokenises that text. Student position j and teacher position i
  are aligned when student token j+1 and teacher token i+1 cover the same byte span [start, end) AND the tokens
  before them end at the same byte: both models have then read the same text and predict the same next span.
  Spans of a byte-level BPE come from the tokens' own bytes (the `tokenizers` offsets are in characters, and two
  tokens holding halves of "é" both get that character's offsets); other tokenizers' character offsets are
  turned into byte offsets, and where two tokens share a character (byte-fallback pieces) the boundary between
  them is unknown and nothing across it aligns. A tokenizer that is not byte-level and does not re-encode its
  decoded text to the same ids gets each token's span from what it adds to the decoded prefix (a slow path).
  Bytes that are not valid UTF-8 (a row cut inside a character) cannot be handed to a
  tokenizer: the teacher skips them and nothing predicting or following them aligns.
- Special tokens (a packed row's eos) cut the text into pieces tokenised one by one; each maps to the teacher's
  token of the same role (bos / eos / pad, from a kdarch tokenizer's `bos_id` ...) or, failing that, of the same
  content, and is skipped by the teacher when it has none. A teacher whose tokenizer prepends tokens of its own
  (a BOS, from its post-processor) gets them at the start of every row, in place of the student's leading special
  token when the row has one.
- The shared vocabulary: the (student id, teacher id) pairs whose tokens are the same bytes (byte-level tokens
  decoded through the GPT-2 byte table, other tokenizers' token text as UTF-8; special tokens by role, then
  content).

Two losses on the aligned rows (`cross_tokenizer_kd_loss`), on materialised student logits [B, T, V_s]:

- "align": the chosen `kd_loss` divergence between student and teacher restricted to the shared vocabulary, each
  side renormalised over it (a softmax over the shared ids' logits). Renormalising both sides keeps the
  divergence a divergence between two distributions (zero when they agree) and never asks the student to put
  mass on ids it cannot pair; the mass either side puts outside the shared set is simply not compared. Total =
  α · soft (mean over aligned rows, × T² as in `kd_loss`) + (1 − α) · hard (student CE on its own labels, mean
  over every labelled row): unaligned rows carry only the hard term. With one tokenizer on both sides every id
  is shared and every row aligns (when the row's text re-tokenises to the same ids, as whole texts do): the
  loss is then `kd_loss` itself.
- "uld" (Universal Logit Distillation, Boizard et al. 2024): the L1 distance between the two probability vectors
  (softmax at T), each sorted in decreasing order, the shorter zero-padded, summed over the vocabulary and
  averaged over aligned rows. It needs no vocabulary mapping and is invariant to any renumbering of either
  vocabulary. Total = hard_weight · hard + uld_weight · soft, as in ULD (α is not used; no T² factor: like TVD it
  is a bounded distance). The student's side holds its tokenizer's ids only, as the teacher's does: padding rows
  of a head larger than the vocabulary are no token and stay out of the sorted vector.

`CrossTokenizerTeacher` wraps a model teacher: it takes the student's ids [B, T], re-tokenises them, runs the
teacher on its own ids and returns a `CrossTokenizerOutput` whose `signal` rows are the teacher's rows moved to
the aligned student positions. Re-tokenisation runs on the host (the ids are read back: one sync per batch).

Shape legend: B batch, T student positions, U teacher positions, V_s / V_t vocabularies, S shared ids, D width.
"""
from __future__ import annotations

import functools
import itertools
import json
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kdarch.checks import check, check_index_range, choice_arg, int_arg, number_arg, tensor_arg
from kdarch.distill.losses import KDLossConfig, KDTerms, kd_loss
from kdarch.distill.teacher_signal import TopKTeacher
from kdarch.distill.teachers import ModelTeacher, Teacher, TeacherOutput
from kdarch.distill.vocab import VocabMismatchError, vocab_fingerprint

__all__ = ["CROSS_TOKENIZER_MODES", "CrossTokenizerOutput", "CrossTokenizerTeacher", "CrossTokenizerTerms",
           "Retokenized", "TokenizerView", "align_spans", "align_text", "cross_tokenizer_kd_loss", "retokenize",
           "shared_vocab"]

CROSS_TOKENIZER_MODES = ("refuse", "align", "uld")
"""What `distill.cross_tokenizer` may say: refuse another tokenizer (`align_vocab`), or distil with a loss here."""
ROLES = ("bos", "eos", "pad")
Span = tuple[int, int]


@functools.cache
def _unicode_to_byte() -> dict[str, int]:
    """The byte each character of a byte-level BPE vocabulary stands for (the inverse of the GPT-2 table)."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    extra = iter(range(256, 512))
    return {(chr(b) if b in printable else chr(next(extra))): b for b in range(256)}


def _is_byte_level(decoder: dict | None) -> bool:
    if not decoder:
        return False
    return decoder.get("type") == "ByteLevel" or any(_is_byte_level(d) for d in decoder.get("decoders") or ())


class TokenizerView:
    """What alignment needs of one tokenizer, read once: a kdarch `Tokenizer` (its `to_hf()`, and its bos / eos /
    pad ids as roles) or a `tokenizers.Tokenizer` (no roles). Holds a private copy of the Hugging Face tokenizer
    that encodes special-token strings in text as text (kdarch's convention)."""

    def __init__(self, tokenizer, who: str = "tokenizer"):
        from tokenizers import Tokenizer as HFTokenizer

        if isinstance(tokenizer, TokenizerView):
            self.__dict__.update(tokenizer.__dict__)
            return
        hf = tokenizer.to_hf() if callable(getattr(tokenizer, "to_hf", None)) else tokenizer
        check(isinstance(hf, HFTokenizer), who, "a kdarch Tokenizer or a tokenizers.Tokenizer", tokenizer,
              error=TypeError)
        text = hf.to_str()
        self.hf = HFTokenizer.from_str(text)
        self.hf.encode_special_tokens = True
        vocab = hf.get_vocab(with_added_tokens=True)
        check(bool(vocab), who, "a tokenizer with a non-empty vocabulary", tokenizer)
        self.vocab_size, self.fingerprint = max(vocab.values()) + 1, vocab_fingerprint(vocab)
        added = hf.get_added_tokens_decoder()
        self.special = {i: t.content for i, t in added.items() if t.special}
        self.roles = {r: i for r in ROLES if isinstance(i := getattr(tokenizer, f"{r}_id", None), int)}
        self.byte_level = _is_byte_level(json.loads(text).get("decoder"))
        table = _unicode_to_byte()
        self.pieces: list[bytes | None] = [None] * self.vocab_size
        """The bytes of each text token; None for special tokens and unused ids."""
        for t, i in vocab.items():
            if i in self.special:
                continue
            byte_token = self.byte_level and i not in added and all(c in table for c in t)
            self.pieces[i] = bytes(table[c] for c in t) if byte_token else t.encode("utf-8")
        probe = self.hf.encode("", add_special_tokens=True)
        self.prefix = [i for i, m in zip(probe.ids, probe.special_tokens_mask) if m]
        """Special ids the tokenizer's post-processor puts before every text (a BOS), if any."""

    def piece(self, i: int) -> bytes | None:
        return self.pieces[i] if 0 <= i < self.vocab_size else None


def _special_map(student: TokenizerView, teacher: TokenizerView) -> dict[int, int]:
    """Student special-token id -> the teacher's token of the same role, else of the same content."""
    by_role = {student.roles[r]: teacher.roles[r] for r in ROLES if r in student.roles and r in teacher.roles}
    by_content = {c: i for i, c in sorted(teacher.special.items(), reverse=True)}
    out = {}
    for i in sorted({*student.special, *student.roles.values()}):
        j = by_role.get(i, by_content.get(student.special.get(i)))
        if j is not None:
            out[i] = j
    return out


def shared_vocab(student, teacher) -> tuple[torch.Tensor, torch.Tensor]:
    """The pairs (student id, teacher id) of tokens with identical bytes (special tokens: same role, else same
    content), one-to-one, by increasing student id: two int64 tensors [S]."""
    s, t = TokenizerView(student, "shared_vocab: student"), TokenizerView(teacher, "shared_vocab: teacher")
    by_bytes: dict[bytes, int] = {}
    for j, p in enumerate(t.pieces):
        if p is not None:
            by_bytes.setdefault(p, j)
    specials, pairs, taken = _special_map(s, t), [], set()
    for i, p in enumerate(s.pieces):
        j = by_bytes.get(p) if p is not None else specials.get(i)
        if j is not None and j not in taken:
            pairs.append((i, j))
            taken.add(j)
    ids = torch.tensor(pairs, dtype=torch.long).reshape(-1, 2)
    return ids[:, 0].contiguous(), ids[:, 1].contiguous()


# ---------------------------------------------------------------------------------------------------- alignment
def _byte_spans(view: TokenizerView, text: str, enc, p0: int) -> list[Span]:
    """Byte spans (from stream position p0) of the tokens `enc` of `text`: the tokens' own bytes for a byte-level
    BPE that spells the text exactly, else the character offsets converted to bytes. Tokens that share a character
    (byte-fallback pieces of one "é": both get its offsets) have an unknown boundary between them: -1 there."""
    data = text.encode("utf-8")
    if view.byte_level:
        pieces = [view.piece(i) for i in enc.ids]
        if None not in pieces and b"".join(pieces) == data:
            ends = itertools.accumulate(len(p) for p in pieces)
            return [(p0 + e - len(p), p0 + e) for p, e in zip(pieces, ends)]
    if len(data) == len(text):
        spans = [(p0 + a, p0 + b) for a, b in enc.offsets]
    else:
        cum = [0]
        for ch in text:
            cum.append(cum[-1] + len(ch.encode("utf-8")))
        spans = [(p0 + cum[a], p0 + cum[b]) for a, b in enc.offsets]
    for k in range(len(spans) - 1):
        if spans[k + 1][0] < spans[k][1]:
            spans[k], spans[k + 1] = (spans[k][0], -1), (-1, spans[k + 1][1])
    return spans


def _prefix_spans(view: TokenizerView, run: list[int], data: bytes, p0: int) -> list[Span]:
    """Spans of tokens that do not re-encode to themselves: token k covers what decoding run[:k+1] adds to the text
    of run[:k] (leading whitespace left out, as offsets do). A token whose prefix text is not a prefix of the whole
    text gets the empty span (-1, -1), which no teacher span equals: nothing aligns with it. Quadratic in the run's
    length: the slow path, for the rare text a tokenizer that is not byte-level encodes otherwise."""
    spans, prev = [], 0
    for k in range(0, len(run), 256):
        for pre in view.hf.decode_batch([run[:m] for m in range(k + 1, min(k + 256, len(run)) + 1)],
                                        skip_special_tokens=False):
            pre = pre.encode("utf-8")
            if len(pre) < prev or not data.startswith(pre):
                spans.append((-1, -1))
                continue
            new = pre[prev:]
            start = prev + len(new) - len(new.lstrip()) if new.strip() else prev
            spans.append((p0 + start, p0 + len(pre)))
            prev = len(pre)
    return spans


def _student_row(view: TokenizerView, ids: list[int]) -> tuple[list[Span], list]:
    """The row on its byte stream: each token's span, and the stream as items (p0, bytes) for text and
    (p, id) for a special token's unit. A non-byte-level tokenizer's text is decoded and re-encoded with offsets
    (`_prefix_spans` when that does not give back the same ids)."""
    spans, items, p, run = [], [], 0, []

    def flush():
        nonlocal p, run
        if not run:
            return
        if view.byte_level:
            data = b"".join(view.pieces[i] for i in run)
            for i in run:
                spans.append((p, p + len(view.pieces[i])))
                p += len(view.pieces[i])
            items.append((p - len(data), data))
        else:
            text = view.hf.decode(run, skip_special_tokens=False)
            enc, data = view.hf.encode(text, add_special_tokens=False), text.encode("utf-8")
            spans.extend(_byte_spans(view, text, enc, p) if enc.ids == run else _prefix_spans(view, run, data, p))
            items.append((p, data))
            p += len(items[-1][1])
        run = []

    for i in ids:
        if view.piece(i) is None:
            flush()
            spans.append((p, p + 1))
            items.append((p, i))
            p += 1
        else:
            run.append(i)
    flush()
    return spans, items


def _valid_utf8(data: bytes):
    """(offset, text) of the maximal valid UTF-8 pieces of `data`; invalid bytes are left out."""
    i = 0
    while i < len(data):
        try:
            yield i, data[i:].decode("utf-8")
            return
        except UnicodeDecodeError as e:
            if e.start:
                yield i, data[i:i + e.start].decode("utf-8")
            i += e.start + max(1, e.end - e.start)


def align_spans(student_spans: list[Span], teacher_spans: list[Span]) -> list[int]:
    """For every student position j: the teacher position i whose next token covers the same span as student token
    j+1 with the tokens before both ending at the same byte, or -1 (always for the last position). A negative
    span coordinate is an unknown boundary: nothing next to it aligns."""
    index: dict[tuple[int, int, int], int] = {}
    for i in range(len(teacher_spans) - 1):
        key = (teacher_spans[i][1], *teacher_spans[i + 1])
        if min(key) >= 0:
            index.setdefault(key, i)
    out = [index.get((student_spans[j][1], *student_spans[j + 1]), -1) for j in range(len(student_spans) - 1)]
    return out + [-1] if student_spans else out


@dataclass(frozen=True)
class Retokenized:
    """A batch of student rows re-tokenised for the teacher."""
    teacher_ids: torch.Tensor
    """[B, U] int64: the teacher's ids, rows padded at the end (teacher's pad id, else 0)."""
    teacher_lengths: torch.Tensor
    """[B] int64: each row's real teacher tokens."""
    teacher_pos: torch.Tensor
    """[B, T] int64: the teacher position aligned with each student position, -1 where none."""
    student_spans: list[list[Span]]
    teacher_spans: list[list[Span]]
    """Each token's byte span on its row's stream (special tokens take one unit; prepended ones may be empty; -1:
    an unknown boundary)."""


def retokenize(student_ids_BT, student, teacher, *, who: str = "retokenize") -> Retokenized:
    """Re-tokenise student rows ([B, T] int tensor or lists of ids) for the teacher and align the positions (module
    docstring); `student` / `teacher` are kdarch or `tokenizers` tokenizers (or `TokenizerView`s)."""
    s, t = TokenizerView(student, f"{who}: student"), TokenizerView(teacher, f"{who}: teacher")
    rows = student_ids_BT.tolist() if isinstance(student_ids_BT, torch.Tensor) else [list(r) for r in student_ids_BT]
    specials = _special_map(s, t)
    s_spans, parts, chunks = [], [], []
    for ids in rows:
        spans, items = _student_row(s, ids)
        s_spans.append(spans)
        row = []  # (id, span) of teacher tokens, or the index of a text chunk in `chunks`
        if t.prefix:
            lead = len(items) > 0 and isinstance(items[0][1], int)
            width = 1 if lead else 0
            row += [(i, (0, width if k == len(t.prefix) - 1 else 0)) for k, i in enumerate(t.prefix)]
            items = items[1:] if lead else items
        for p, x in items:
            if isinstance(x, int):
                if x in specials:
                    row.append((specials[x], (p, p + 1)))
                continue
            for off, text in _valid_utf8(x):
                row.append(len(chunks))
                chunks.append((p + off, text))
        parts.append(row)
    encs = t.hf.encode_batch([text for _, text in chunks], add_special_tokens=False) if chunks else []
    t_ids, t_spans = [], []
    for row in parts:
        ids, spans = [], []
        for x in row:
            if isinstance(x, int):
                (p0, text), enc = chunks[x], encs[x]
                ids += enc.ids
                spans += _byte_spans(t, text, enc, p0)
            else:
                ids.append(x[0])
                spans.append(x[1])
        t_ids.append(ids)
        t_spans.append(spans)
    U = max([1, *map(len, t_ids)])
    pad = t.roles.get("pad", 0)
    device = student_ids_BT.device if isinstance(student_ids_BT, torch.Tensor) else None
    teacher_ids = torch.tensor([r + [pad] * (U - len(r)) for r in t_ids], dtype=torch.long, device=device)
    pos = torch.tensor([align_spans(a, b) for a, b in zip(s_spans, t_spans)], dtype=torch.long, device=device)
    lengths = torch.tensor([len(r) for r in t_ids], dtype=torch.long, device=device)
    return Retokenized(teacher_ids.reshape(len(rows), U), lengths, pos.reshape(len(rows), -1), s_spans, t_spans)


def align_text(text: str, student, teacher) -> Retokenized:
    """`retokenize` of one text as the student's tokenizer encodes it (no special tokens): a batch of one row."""
    s = TokenizerView(student, "align_text: student")
    return retokenize([s.hf.encode(text, add_special_tokens=False).ids], s, teacher, who="align_text")


# ---------------------------------------------------------------------------------------------------- teacher
@dataclass(frozen=True)
class CrossTokenizerOutput(TeacherOutput):
    """A `TeacherOutput` in the student's positions. `signal` is [B, T, V_t] float32: row j holds the teacher's row
    `teacher_pos[j]` (its distribution of the same next span), zeros where unaligned; `hidden_states` likewise
    (each [B, T, D], zeros where unaligned)."""
    teacher_pos: torch.Tensor | None = None
    """[B, T] int64: the aligned teacher position of each student position, -1 where none."""
    teacher_ids: torch.Tensor | None = None
    """[B, U] int64: the ids the teacher ran on (padded at the end)."""
    shared_student_ids: torch.Tensor | None = None
    """[S] int64: student ids of the shared vocabulary, paired with `shared_teacher_ids` [S]."""
    shared_teacher_ids: torch.Tensor | None = None
    student_vocab_size: int = 0
    """The student tokenizer's vocabulary (the student's logits may have more rows, for padding)."""

    @property
    def aligned(self) -> torch.Tensor:
        """[B, T] bool: the positions with a teacher row."""
        return self.teacher_pos >= 0


class CrossTokenizerTeacher(Teacher):
    """A teacher that speaks another tokenizer, behind the student's ids: a model whose output has `.logits` (a
    `kdarch.CausalLM`, a transformers causal LM: wrapped in a `ModelTeacher`) or a dense-logit `Teacher`.
    `teacher(student_ids_BT)` re-tokenises the rows, runs the inner teacher on its own ids (a batch padded at the
    end, under no_grad) and returns a `CrossTokenizerOutput` for `cross_tokenizer_kd_loss`. The teacher's logits
    are cut to its tokenizer's vocabulary (model padding rows carry no token)."""

    def __init__(self, teacher: Teacher | nn.Module, student_tokenizer, teacher_tokenizer, name: str | None = None):
        who = "CrossTokenizerTeacher"
        if isinstance(teacher, nn.Module):
            teacher = ModelTeacher(teacher)
        check(isinstance(teacher, Teacher) and not isinstance(teacher, CrossTokenizerTeacher), f"{who}: teacher",
              "a model with .logits or a kdarch.distill Teacher with dense logits (e.g. a ModelTeacher)", teacher,
              error=TypeError)
        self.inner = teacher
        self.student = TokenizerView(student_tokenizer, f"{who}: student_tokenizer")
        self.teacher_tokenizer = TokenizerView(teacher_tokenizer, f"{who}: teacher_tokenizer")
        Vt = self.teacher_tokenizer.vocab_size
        check(Vt <= teacher.vocab_size, f"{who}: teacher_tokenizer",
              f"a vocabulary that fits the teacher's {teacher.vocab_size} logits", f"{Vt} ids")
        if teacher.fingerprint is not None and teacher.fingerprint != self.teacher_tokenizer.fingerprint:
            raise VocabMismatchError(f"{who}: teacher_tokenizer (fingerprint {self.teacher_tokenizer.fingerprint}) "
                                     f"is not the teacher's (fingerprint {teacher.fingerprint})")
        self.shared_student_ids, self.shared_teacher_ids = shared_vocab(self.student, self.teacher_tokenizer)
        check(self.shared_student_ids.numel() > 0, f"{who}: tokenizers", "at least one token both vocabularies share",
              "none")
        self.student_vocab_size = self.student.vocab_size
        super().__init__(name if name is not None else f"{teacher.name}~retokenised", teacher.fingerprint, Vt)

    def align_to(self, student_vocab_size: int | None, *, student_fingerprint: str | None = None,
                 n_real_tokens: int | None = None) -> CrossTokenizerTeacher:
        """Accept a student of another tokenizer: checks only that `student_fingerprint` (if given) is the student
        tokenizer's and that its ids fit `student_vocab_size` (the student's logits); returns self."""
        fp = self.student.fingerprint
        if student_fingerprint is not None and student_fingerprint != fp:
            raise VocabMismatchError(f"CrossTokenizerTeacher: the student's fingerprint {student_fingerprint} is not "
                                     f"that of the student_tokenizer it was given ({fp})")
        if student_vocab_size is not None:
            self.student_vocab_size = int_arg("CrossTokenizerTeacher.align_to: student_vocab_size",
                                              student_vocab_size, min=self.student.vocab_size)
        return self

    def __call__(self, input_ids_BT: torch.Tensor, indices_B=None, *, hidden_states: bool = False):
        who = f"CrossTokenizerTeacher({self.name}): input_ids"
        tensor_arg(who, input_ids_BT, dim=2, dtypes=(torch.int64, torch.int32), nonempty=True,
                   what="a non-empty int64/int32 tensor [B, T] of student ids")
        check_index_range(who, input_ids_BT, self.student_vocab_size, what="student token ids")
        with torch.no_grad():
            return self._run(input_ids_BT, indices_B, hidden_states)

    def _run(self, input_ids_BT, indices_B, hidden_states) -> CrossTokenizerOutput:
        rt = retokenize(input_ids_BT.cpu(), self.student, self.teacher_tokenizer, who=f"{self.name}")
        dev = input_ids_BT.device
        out = self.inner(rt.teacher_ids.to(dev), indices_B, hidden_states=hidden_states)
        if isinstance(out.signal, TopKTeacher):
            raise TypeError(f"CrossTokenizerTeacher({self.name}): expected a teacher with dense logits (a model "
                            f"teacher run on the re-tokenised ids), got a top-k signal from {self.inner!r}")
        pos_BT = rt.teacher_pos.to(dev)
        keep_BT1 = (pos_BT >= 0)[..., None]

        def gather(x_BUX):
            idx = pos_BT.clamp_min(0)[..., None].expand(-1, -1, x_BUX.shape[-1])
            return x_BUX.gather(1, idx).masked_fill_(~keep_BT1, 0)

        signal = gather(out.signal[..., :self.native_vocab_size])
        hidden = tuple(gather(h) for h in out.hidden_states) if out.hidden_states is not None else None
        return CrossTokenizerOutput(signal, hidden, pos_BT, rt.teacher_ids.to(dev), self.shared_student_ids.to(dev),
                                    self.shared_teacher_ids.to(dev), self.student.vocab_size)


# ---------------------------------------------------------------------------------------------------- losses
@dataclass
class CrossTokenizerTerms(KDTerms):
    n_aligned: int | torch.Tensor = 0
    """Rows the soft term averaged over (labelled and aligned), a 0-dim tensor."""


def cross_tokenizer_kd_loss(student_logits: torch.Tensor, out: CrossTokenizerOutput, labels: torch.Tensor | None,
                            *, mode: str = "align", kind: str = "forward_kl", temperature: float = 1.0,
                            alpha: float = 0.5, beta: float = 0.5, uld_weight: float = 1.0, hard_weight: float = 1.0,
                            ignore_index: int = -100, return_terms: bool = False):
    """The "align" or "uld" loss (module docstring) of materialised student logits [B, T, V_s] against a
    `CrossTokenizerOutput` (from `CrossTokenizerTeacher`).

    labels: [B, T] the student's input ids in the HF convention (shifted here: position j predicts labels[j+1]
    and the last position has no target; ignore_index marks tokens not to predict), or None (no hard term: every
    aligned row counts; "align" then needs alpha=1). "align" uses kind / temperature / alpha / beta as `kd_loss`;
    "uld" uses temperature, uld_weight and hard_weight (total = hard_weight · hard + uld_weight · soft; the sorted
    vectors hold the student tokenizer's ids only, not padding rows of a larger head). Returns the scalar loss, or
    CrossTokenizerTerms(total, soft, hard, n_tokens, n_aligned) with return_terms (soft / hard detached)."""
    who = "cross_tokenizer_kd_loss"
    choice_arg(f"{who}: mode", mode, CROSS_TOKENIZER_MODES[1:])
    cfg = KDLossConfig(kind, temperature, alpha, beta, ignore_index)
    number_arg(f"{who}: uld_weight", uld_weight, min=0)
    number_arg(f"{who}: hard_weight", hard_weight, min=0)
    check(isinstance(out, CrossTokenizerOutput) and out.teacher_pos is not None, f"{who}: out",
          "a CrossTokenizerOutput (from a CrossTokenizerTeacher)", type(out).__name__, error=TypeError)
    B, T = out.teacher_pos.shape
    tensor_arg(f"{who}: student_logits", student_logits, dim=3, floating=True, shape=(B, T, None),
               what=f"float logits [B, T, V_s] with [B, T] = [{B}, {T}] like the teacher output")
    V = student_logits.shape[-1]
    check(V >= out.student_vocab_size, f"{who}: student_logits",
          f"V_s >= {out.student_vocab_size} (the student tokenizer's vocabulary)", student_logits)
    check(student_logits.device == out.signal.device, f"{who}: student_logits",
          f"a tensor on the teacher output's device ({out.signal.device})", student_logits.device)
    if labels is None:
        check(mode == "uld" or alpha == 1, f"{who}: labels",
              f"a labels tensor (the hard-label term, alpha={alpha} < 1, needs labels; or pass alpha=1)", None)
        valid_BT = torch.ones(B, T, dtype=torch.bool, device=student_logits.device)
        target_BT = None
    else:
        tensor_arg(f"{who}: labels", labels, dtypes=(torch.int64, torch.int32), shape=(B, T),
                   what=f"an int64/int32 tensor [B, T] = [{B}, {T}] (the input ids, shifted inside)")
        check_index_range(f"{who}: labels", labels, V, ignore=ignore_index, what="token ids")
        target_BT = torch.cat([labels[:, 1:].long(), labels.new_full((B, 1), ignore_index, dtype=torch.long)], 1)
        valid_BT = target_BT != ignore_index
    aligned_BT = out.aligned & valid_BT
    n, n_a = valid_BT.sum(), aligned_BT.sum()
    cdt = torch.float64 if student_logits.dtype == torch.float64 else torch.float32
    hard = None
    if target_BT is not None:
        ce = F.cross_entropy(student_logits.reshape(-1, V).to(cdt), target_BT.reshape(-1), ignore_index=ignore_index,
                             reduction="sum")
        hard = ce / n.clamp_min(1)
    if mode == "align":
        s_BTS = student_logits.index_select(-1, out.shared_student_ids)
        t_BTS = out.signal.index_select(-1, out.shared_teacher_ids)
        marks_BT = torch.where(aligned_BT, 0, ignore_index)  # labels that only say which rows the mean runs over
        soft = kd_loss(s_BTS, t_BTS, marks_BT, kind=kind, temperature=temperature, alpha=1.0, beta=beta,
                       ignore_index=ignore_index)
        total = alpha * soft + (1 - alpha) * hard if hard is not None else soft
    else:
        T_ = cfg.temperature
        s_BTV = student_logits[..., :out.student_vocab_size or V].to(cdt)
        ps_BTV = (s_BTV / T_).sort(-1, descending=True).values.softmax(-1)  # sort, then softmax:
        pt_BTW = (out.signal.to(cdt) / T_).sort(-1, descending=True).values.softmax(-1)  # exactly order-free
        W = max(ps_BTV.shape[-1], pt_BTW.shape[-1])
        d_BT = (F.pad(ps_BTV, (0, W - ps_BTV.shape[-1])) - F.pad(pt_BTW, (0, W - pt_BTW.shape[-1]))).abs().sum(-1)
        soft = torch.where(aligned_BT, d_BT, 0).sum() / n_a.clamp_min(1)
        total = hard_weight * hard + uld_weight * soft if hard is not None else uld_weight * soft
    if not return_terms:
        return total
    return CrossTokenizerTerms(total, soft.detach(), hard.detach() if hard is not None else None, n, n_a)
