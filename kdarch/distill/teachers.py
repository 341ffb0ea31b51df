"""Teachers behind one interface: a kdarch model, a local Hugging Face causal LM, or an on-disk logit cache.

Why one interface: the trainer asks `teacher(input_ids_BT, indices_B)` once per batch and hands the signal to
`kd_loss` / `fused_kd_loss` unchanged, whatever produced it: dense float32 logits [B, T, V], or a `TopKTeacher`
[B, T, K] from a cache. Row j is the teacher's distribution of token j + 1 (the causal-LM convention, the same
rows as the student's logits). Every teacher reports `name` (an id, recorded by the logit cache), `fingerprint`
(its tokenizer's vocabulary, None when unknown) and `vocab_size` after `align_to` paired it with the student's
vocabulary through `kdarch.distill.vocab.align_vocab`, the single alignment rule (padding rows cut or padded
with -inf, real tokenizer mismatches refused).

Teachers run in eval mode under `torch.no_grad()`, so they never receive a gradient. Not `inference_mode`: its
tensors may not be saved for the backward of the student's graph, which a trainer mixing teacher outputs into
its own computations (feature KD projectors, for instance) would trip over.

Shape legend: B batch, T sequence length, V vocabulary (after alignment), K top-k, D hidden width.
"""
from __future__ import annotations

import abc
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from kdarch.distill.logit_cache import MANIFEST, LogitCache
from kdarch.distill.teacher_signal import MODES, TopKTeacher
from kdarch.distill.vocab import VocabAlignment, align_vocab, tokenizer_fingerprint

__all__ = ["CachedTeacher", "HFTeacher", "ModelTeacher", "Teacher", "TeacherOutput", "load_teacher",
           "weights_digest"]


@dataclass(frozen=True)
class TeacherOutput:
    signal: torch.Tensor | TopKTeacher
    """Dense logits [B, T, V] float32 or a `TopKTeacher` [B, T, K]; row j is the distribution of token j + 1."""
    hidden_states: tuple[torch.Tensor, ...] | None = None
    """The embedding output and every layer's output, each [B, T, D] float32, on request; as the model returns
    them (a transformers model applies its final norm to the last entry, a kdarch model does not)."""


class Teacher(abc.ABC):
    """The interface. Subclasses call `__init__` with their identity and implement `_run`."""

    def __init__(self, name: str, fingerprint: str | None, native_vocab_size: int):
        if not isinstance(name, str) or not name:
            raise ValueError(f"{type(self).__name__}: name must be a non-empty string, got {name!r}")
        if fingerprint is not None and not isinstance(fingerprint, str):
            raise ValueError(f"{type(self).__name__}: fingerprint must be a string or None, got {fingerprint!r}")
        self.name, self.fingerprint = name, fingerprint
        self.native_vocab_size = native_vocab_size
        self.alignment: VocabAlignment = align_vocab(native_vocab_size)

    @property
    def vocab_size(self) -> int:
        """The signal's vocabulary: the student's after `align_to`, else the teacher's own."""
        return self.alignment.student_vocab_size

    def align_to(self, student_vocab_size: int | None, *, student_fingerprint: str | None = None,
                 n_real_tokens: int | None = None) -> Teacher:
        """Pair the signal with a student's vocabulary (see `align_vocab`); returns self."""
        self.alignment = align_vocab(self.native_vocab_size, student_vocab_size, teacher_fingerprint=self.fingerprint,
                                     student_fingerprint=student_fingerprint, n_real_tokens=n_real_tokens)
        return self

    def __call__(self, input_ids_BT: torch.Tensor, indices_B=None, *, hidden_states: bool = False) -> TeacherOutput:
        """The teacher's signal for a batch of token ids [B, T]; `indices_B` are the rows' dataset sequence
        indices (needed by a cached teacher, ignored by the others)."""
        who = f"{type(self).__name__}({self.name})"
        if not isinstance(input_ids_BT, torch.Tensor) or input_ids_BT.dim() != 2 or \
                input_ids_BT.dtype not in (torch.int64, torch.int32) or input_ids_BT.numel() == 0:
            got = f"{input_ids_BT.dtype} tensor of shape {tuple(input_ids_BT.shape)}" \
                if isinstance(input_ids_BT, torch.Tensor) else type(input_ids_BT).__name__
            raise ValueError(f"{who}: input_ids must be a non-empty int64/int32 tensor [B, T], got {got}")
        lo, hi = torch.aminmax(input_ids_BT)
        if lo < 0 or hi >= self.native_vocab_size:
            raise ValueError(f"{who}: token ids must lie in [0, {self.native_vocab_size}), got values in "
                             f"[{int(lo)}, {int(hi)}]")
        with torch.no_grad():
            signal, hidden = self._run(input_ids_BT, indices_B, hidden_states)
        return TeacherOutput(self.alignment.apply(signal), hidden)

    @abc.abstractmethod
    def _run(self, input_ids_BT: torch.Tensor, indices_B, hidden_states: bool):
        """(signal [B, T, V_native] or TopKTeacher, hidden-state tuple or None) for a checked batch."""

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(name={self.name!r}, vocab_size={self.vocab_size}, "
                f"fingerprint={self.fingerprint!r})")


def weights_digest(module: nn.Module, sample: int = 4096) -> str:
    """A short id of a module's weights: sha256 over every tensor's name, shape, dtype and a strided sample of up
    to `sample` of its values. Two checkpoints (different trainings) differ everywhere, so this tells them apart
    without reading every byte of a large teacher; pass an explicit name for anything finer."""
    h = hashlib.sha256()
    for key, t in module.state_dict().items():
        flat = t.detach().reshape(-1)
        part = flat[::max(1, flat.numel() // sample)][:sample].contiguous().cpu()
        h.update(f"{key}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(part.view(torch.uint8).numpy().tobytes())
    return "sha256:" + h.hexdigest()[:16]


class ModelTeacher(Teacher):
    """A model whose output has `.logits` [B, T, V] (a `kdarch.CausalLM`, a transformers causal LM, ...).

    `name` defaults to "<class>@<weights_digest>"; `vocab_size` to `model.config.vocab_size`. The model is put in
    eval mode (again on every call, should something switch it back); its outputs come back float32 on the
    input ids' device."""
    forward_kwargs: dict = {}

    def __init__(self, model: nn.Module, name: str | None = None, fingerprint: str | None = None,
                 vocab_size: int | None = None):
        if not isinstance(model, nn.Module):
            raise ValueError(f"ModelTeacher: expected a torch.nn.Module, got {type(model).__name__}")
        V = vocab_size if vocab_size is not None else getattr(getattr(model, "config", None), "vocab_size", None)
        if isinstance(V, bool) or not isinstance(V, int) or V < 1:
            raise ValueError(f"ModelTeacher: the model has no config.vocab_size; pass vocab_size (a positive int), "
                             f"got {V!r}")
        self.model = model.eval()
        super().__init__(name if name is not None else f"{type(model).__name__}@{weights_digest(model)}",
                         fingerprint, V)

    def _run(self, input_ids_BT, indices_B, hidden_states):
        if self.model.training:
            self.model.eval()
        param = next(self.model.parameters(), None)
        ids_BT = input_ids_BT.long().to(param.device if param is not None else input_ids_BT.device)
        out = self.model(ids_BT, output_hidden_states=hidden_states, **self.forward_kwargs)
        logits_BTV = getattr(out, "logits", None)
        want = (*input_ids_BT.shape, self.native_vocab_size)
        if not isinstance(logits_BTV, torch.Tensor) or tuple(logits_BTV.shape) != want:
            got = tuple(logits_BTV.shape) if isinstance(logits_BTV, torch.Tensor) else type(logits_BTV).__name__
            raise ValueError(f"ModelTeacher({self.name}): expected output .logits of shape {want}, got {got}")
        dev = input_ids_BT.device
        hidden = tuple(h.float().to(dev) for h in out.hidden_states) if hidden_states else None
        return logits_BTV.float().to(dev), hidden


class HFTeacher(ModelTeacher):
    """A local Hugging Face causal-LM directory, loaded with `transformers.AutoModelForCausalLM` in `dtype` on
    `device`; the fingerprint comes from the directory's tokenizer.json when there is one. Logits are float32
    whatever the compute dtype."""
    forward_kwargs = {"use_cache": False}

    def __init__(self, path: str | os.PathLike, dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu",
                 name: str | None = None, fingerprint: str | None = None):
        path = Path(path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"HFTeacher: {path} has no config.json (expected a Hugging Face model directory)")
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"HFTeacher: dtype must be a floating torch.dtype (torch.bfloat16, torch.float32, ...), "
                             f"got {dtype!r}")
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).to(device)
        self.path = path
        super().__init__(model, name=name, fingerprint=fingerprint if fingerprint is not None else
                         tokenizer_fingerprint(path))


class CachedTeacher(Teacher):
    """Rows of a `LogitCache`, looked up by dataset sequence index. The batch's token ids must equal the ids the
    cache was computed on (a prefix of each cached sequence is fine: causal rows do not see later tokens);
    anything else means a cache made for other data or another tokenizer, and is refused."""

    def __init__(self, cache: LogitCache | str | os.PathLike, *, mode: str = "tail"):
        if mode not in MODES:
            raise ValueError(f"CachedTeacher: mode must be one of {MODES}, got {mode!r}")
        self.cache = cache if isinstance(cache, LogitCache) else LogitCache(cache)
        self.mode = mode
        super().__init__(self.cache.teacher_id, self.cache.fingerprint, self.cache.vocab_size)

    def _run(self, input_ids_BT, indices_B, hidden_states):
        if hidden_states:
            raise ValueError("CachedTeacher: a logit cache holds no hidden states; use a model teacher for "
                             "feature distillation")
        if indices_B is None:
            raise ValueError("CachedTeacher: pass indices_B, the dataset sequence index of every batch row")
        B, T = input_ids_BT.shape
        cached_BS, tk = self.cache.get(indices_B)
        if cached_BS.shape[0] != B:
            raise ValueError(f"CachedTeacher: {cached_BS.shape[0]} indices for a batch of {B} sequences")
        if T > self.cache.seq_len:
            raise ValueError(f"CachedTeacher: sequences of {T} tokens, the cache holds {self.cache.seq_len} per "
                             f"sequence")
        bad_B = (cached_BS[:, :T] != input_ids_BT.cpu().long()).any(1)
        if bad_B.any():
            b = int(bad_B.nonzero()[0])
            idx = int(torch.as_tensor(indices_B).reshape(-1)[b])
            t = int((cached_BS[b, :T] != input_ids_BT[b].cpu()).nonzero()[0])
            raise ValueError(f"CachedTeacher: the batch's tokens differ from the cache's at sequence index {idx} "
                             f"(token {t}: {int(input_ids_BT[b, t])} vs cached {int(cached_BS[b, t])}); the cache "
                             f"{self.cache.path} was computed on other data or with another tokenizer")
        dev = input_ids_BT.device
        return TopKTeacher(tk.ids[:, :T].to(dev), tk.values[:, :T].to(dev), "logprobs", tk.tail_mass[:, :T].to(dev),
                           self.mode), None


def load_teacher(spec: str | os.PathLike, *, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
                 student_vocab_size: int | None = None, student_fingerprint: str | None = None,
                 n_real_tokens: int | None = None, verify: bool = True) -> Teacher:
    """The teacher a directory holds: a logit cache (manifest.json) -> CachedTeacher (shards checksummed when
    `verify`); a kdarch model directory -> ModelTeacher (dtype default: as saved); any other model directory with
    config.json -> HFTeacher (dtype default bfloat16). The student's vocabulary arguments go to `align_to`."""
    path = Path(spec)
    if (path / MANIFEST).is_file():
        teacher: Teacher = CachedTeacher(LogitCache(path, verify=verify))
    elif (path / "config.json").is_file():
        try:
            model_type = json.loads((path / "config.json").read_text()).get("model_type")
        except (json.JSONDecodeError, AttributeError) as e:
            raise ValueError(f"load_teacher: {path / 'config.json'} is not a JSON object ({e})") from None
        if model_type == "kdarch":
            from kdarch.pretrained import from_pretrained
            teacher = ModelTeacher(from_pretrained(path, dtype=dtype, device=device),
                                   fingerprint=tokenizer_fingerprint(path))
        else:
            teacher = HFTeacher(path, dtype=dtype if dtype is not None else torch.bfloat16, device=device)
    else:
        raise FileNotFoundError(f"load_teacher: {path} is not a teacher; expected a directory holding a logit cache "
                                f"({MANIFEST}), a kdarch model or a Hugging Face causal LM (config.json)")
    if student_vocab_size is not None or student_fingerprint is not None or n_real_tokens is not None:
        teacher.align_to(student_vocab_size, student_fingerprint=student_fingerprint, n_real_tokens=n_real_tokens)
    return teacher
