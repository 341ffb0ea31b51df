"""Teachers behind one interface: a kdarch model, a local Hugging Face causal LM (here), or an on-disk logit
cache (`CachedTeacher`, in `logit_cache.py`); `load_teacher` (`loading.py`) picks the right one for a path.

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
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from kdarch.checks import check, check_index_range, fail, is_int, optional_import, tensor_arg
from kdarch.convert.hf import mtp_layers_note
from kdarch.distill.teacher_signal import TopKTeacher
from kdarch.distill.vocab import VocabAlignment, align_vocab, tokenizer_fingerprint
from kdarch.io import read_json

__all__ = ["HFTeacher", "ModelTeacher", "Teacher", "TeacherOutput", "hf_kv_cache_elements_per_token", "weights_digest"]

log = logging.getLogger(__name__)


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
        who = type(self).__name__
        check(isinstance(name, str) and name != "", f"{who}: name", "a non-empty string", name)
        check(fingerprint is None or isinstance(fingerprint, str), f"{who}: fingerprint", "a string or None",
              fingerprint)
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
        who = f"{type(self).__name__}({self.name}): input_ids"
        tensor_arg(who, input_ids_BT, dim=2, dtypes=(torch.int64, torch.int32), nonempty=True,
                   what="a non-empty int64/int32 tensor [B, T]")
        check_index_range(who, input_ids_BT, self.native_vocab_size, what="token ids")
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
                 vocab_size: int | None = None, compile: bool = False):
        check(isinstance(model, nn.Module), "ModelTeacher: model", "a torch.nn.Module", type(model).__name__)
        V = vocab_size if vocab_size is not None else getattr(getattr(model, "config", None), "vocab_size", None)
        check(is_int(V) and V >= 1, "ModelTeacher: vocab_size",
              "a positive int (pass vocab_size= when the model has no config.vocab_size)", V)
        self.model = model.eval()
        super().__init__(name if name is not None else f"{type(model).__name__}@{weights_digest(model)}",
                         fingerprint, V)
        if compile:  # after the digest: compiling wraps the forward, not the weights
            self.model.compile()

    def _run(self, input_ids_BT, indices_B, hidden_states):
        if self.model.training:
            self.model.eval()
        param = next(self.model.parameters(), None)
        ids_BT = input_ids_BT.long().to(param.device if param is not None else input_ids_BT.device)
        out = self.model(ids_BT, output_hidden_states=hidden_states, **self.forward_kwargs)
        logits_BTV = getattr(out, "logits", None)
        want = (*input_ids_BT.shape, self.native_vocab_size)
        if not isinstance(logits_BTV, torch.Tensor) or tuple(logits_BTV.shape) != want:
            fail(f"ModelTeacher({self.name}): the model's output .logits", f"a tensor of shape {want}",
                 logits_BTV if isinstance(logits_BTV, torch.Tensor) else type(logits_BTV).__name__)
        dev = input_ids_BT.device
        hidden = tuple(h.float().to(dev) for h in out.hidden_states) if hidden_states else None
        return logits_BTV.float().to(dev), hidden

    def figures(self) -> dict:
        """The report's sizes of the teacher model: parameters (active per token too when known), the KV-cache
        bytes one token of context costs in the cache the model generates with, and the compute dtype."""
        cfg = getattr(self.model, "config", None)
        param = next(self.model.parameters(), None)
        if callable(getattr(cfg, "figures", None)):  # a kdarch model: its latent cache
            return {**cfg.figures(), "dtype": str(param.dtype).removeprefix("torch.")}
        out = {"params_total": sum(p.numel() for p in self.model.parameters())}
        moe = any(getattr(cfg, k, None) for k in ("num_experts_per_tok", "num_experts", "n_routed_experts"))
        if not moe:
            out["params_active"] = out["params_total"]
        if param is not None and (kv := hf_kv_cache_elements_per_token(cfg)) is not None:
            out["kv_cache_bytes_per_token"] = kv * param.element_size()
        if param is not None:
            out["dtype"] = str(param.dtype).removeprefix("torch.")
        return out


def hf_kv_cache_elements_per_token(cfg) -> int | None:
    """Elements a transformers causal LM caches per token of context: keys and values of every layer, over its
    key/value heads (DeepseekV3: full query-head keys qk_nope + qk_rope and values v_head, as transformers keeps
    them); sliding-window layers counted in full (the cost within the window). None when the config does not
    say."""
    layers, heads = getattr(cfg, "num_hidden_layers", None), getattr(cfg, "num_attention_heads", None)
    if not (is_int(layers) and is_int(heads)):
        return None
    if getattr(cfg, "kv_lora_rank", None) and getattr(cfg, "v_head_dim", None):
        return layers * heads * (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim + cfg.v_head_dim)
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or getattr(cfg, "hidden_size", 0) // heads
    return layers * 2 * kv_heads * head_dim if head_dim else None


class HFTeacher(ModelTeacher):
    """A local Hugging Face causal-LM directory, loaded with `transformers.AutoModelForCausalLM` in `dtype` on
    `device`; the fingerprint comes from the directory's tokenizer.json when there is one. Logits are float32
    whatever the compute dtype."""
    forward_kwargs = {"use_cache": False}

    def __init__(self, path: str | os.PathLike, dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu",
                 name: str | None = None, fingerprint: str | None = None, compile: bool = False):
        path = Path(path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"HFTeacher: {path}: expected a Hugging Face model directory (with config.json), "
                                    f"got a path without one")
        check(isinstance(dtype, torch.dtype) and dtype.is_floating_point, "HFTeacher: dtype",
              "a floating torch.dtype (torch.bfloat16, torch.float32, ...)", dtype)
        transformers = optional_import("transformers", extra="hf", purpose="A Hugging Face teacher (HFTeacher)")
        note = mtp_layers_note(read_json(path / "config.json"))
        verbosity = transformers.logging.get_verbosity()
        if note:  # say it once, in place of transformers' table of the MTP layer's tensors
            log.warning("HFTeacher %s: %s", path, note)
            transformers.logging.set_verbosity_error()
        try:
            model = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).to(device)
        finally:
            transformers.logging.set_verbosity(verbosity)
        self.path = path
        super().__init__(model, name=name, fingerprint=fingerprint if fingerprint is not None else
                         tokenizer_fingerprint(path), compile=compile)
