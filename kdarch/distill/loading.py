"""`load_teacher`: the teacher a path holds, whatever produced it.

A trainer is given a path and should not need to know what is behind it: a logit cache written by
`kdarch cache-teacher` (manifest.json), a kdarch model directory (config.json with model_type "kdarch"),
any other local Hugging Face causal-LM directory, or a GGUF file (imported once into such a directory,
`kdarch.convert.gguf`). Each becomes the matching `Teacher`, paired with the
student's vocabulary when the caller says what it is.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from kdarch.convert.gguf import import_gguf, is_gguf
from kdarch.distill.logit_cache import CachedTeacher, LogitCache
from kdarch.distill.teachers import HFTeacher, ModelTeacher, Teacher
from kdarch.distill.vocab import tokenizer_fingerprint
from kdarch.io import MANIFEST, read_json
from kdarch.pretrained import KDARCH_MODEL_TYPE, from_pretrained

__all__ = ["load_teacher"]


def load_teacher(spec: str | os.PathLike, *, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
                 student_vocab_size: int | None = None, student_fingerprint: str | None = None,
                 n_real_tokens: int | None = None, verify: bool = True, compile: bool = False) -> Teacher:
    """The teacher a directory holds: a logit cache (manifest.json) -> CachedTeacher (shards checksummed when
    `verify`); a kdarch model directory -> ModelTeacher (dtype default: as saved); any other model directory with
    config.json -> HFTeacher (dtype default bfloat16); a .gguf file -> HFTeacher of its imported directory. The
    student's vocabulary arguments go to `align_to`; `compile` runs a model teacher's forward under
    `torch.compile`."""
    path = Path(spec)
    if is_gguf(path):
        path = import_gguf(path)
    if (path / MANIFEST).is_file():
        teacher: Teacher = CachedTeacher(LogitCache(path, verify=verify))
    elif (path / "config.json").is_file():
        raw = read_json(path / "config.json")
        if not isinstance(raw, dict):
            raise ValueError(f"load_teacher: {path / 'config.json'}: expected a JSON object, got {type(raw).__name__}")
        if raw.get("model_type") == KDARCH_MODEL_TYPE:
            teacher = ModelTeacher(from_pretrained(path, dtype=dtype, device=device),
                                   fingerprint=tokenizer_fingerprint(path), compile=compile)
        else:
            teacher = HFTeacher(path, dtype=dtype if dtype is not None else torch.bfloat16, device=device,
                                compile=compile)
    else:
        raise FileNotFoundError(f"load_teacher: {path}: expected a directory holding a logit cache ({MANIFEST}), a "
                                f"kdarch model or a Hugging Face causal LM (config.json), or a .gguf file, got neither")
    if student_vocab_size is not None or student_fingerprint is not None or n_real_tokens is not None:
        teacher.align_to(student_vocab_size, student_fingerprint=student_fingerprint, n_real_tokens=n_real_tokens)
    return teacher
