"""On-disk teacher logit cache: per token the teacher's top-k log-probs and exact tail mass, in checksummed shards.

Why: a big teacher costs more per token than the student it teaches, and the same dataset is seen for many
epochs and by many students. Running it once and keeping `TopKTeacher.from_logits` of every position (k = 64
holds nearly all of a trained model's mass, for ~260 bytes a token instead of 4·V) makes distillation cost
about as much as training the student alone.

A cache directory:
  manifest.json            format and version, identity (teacher id, tokenizer fingerprint, vocab size, k, value
                           dtype, seq_len, number of sequences, shard size, sha256 of the whole input-ids array)
                           and per shard: file, first sequence index, count, bytes, sha256
  shard_00000.safetensors  input_ids [n, T] int32 (what the rows were computed on, checked by CachedTeacher),
                           topk_ids [n, T, K] uint16 when V <= 65536 else int32, topk_logprobs [n, T, K] in the
                           value dtype, tail_mass [n, T] float32
Row t of a sequence is the teacher's distribution of token t + 1. Sequence i lives in shard i // shard_size.

Crash safety and resume: every shard and the manifest are written to a temp file and renamed. The manifest is
written before the first shard and rewritten after each one, listing only finished shards with their checksums.
A rerun with the same identity keeps listed shards whose bytes still hash to the recorded sha256 and recomputes
everything else, overwriting in place (no shard is ever listed twice); a rerun with another identity is refused.

Shape legend: N sequences, T sequence length, K top-k, B looked-up sequences, n sequences in one shard.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from collections import OrderedDict
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import save_file

from kdarch.distill.teacher_signal import TopKTeacher
from kdarch.distill.vocab import VocabMismatchError
from kdarch.pretrained import atomic_write, read_safetensors

__all__ = ["FORMAT", "FORMAT_VERSION", "MANIFEST", "VALUE_DTYPES", "LogitCache", "write_logit_cache"]

FORMAT, FORMAT_VERSION, MANIFEST = "kdarch-logit-cache", 1, "manifest.json"
VALUE_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
IDENTITY = ("format", "format_version", "teacher_id", "fingerprint", "vocab_size", "k", "dtype", "ids_dtype",
            "seq_len", "num_sequences", "shard_size", "input_ids_sha256")
"""Manifest fields that must match for a rerun to resume into an existing cache."""


def ids_dtype_for(vocab_size: int) -> str:
    """Storage dtype of top-k ids: uint16 while every id fits (V <= 65536), else int32."""
    return "uint16" if vocab_size <= 1 << 16 else "int32"


def shard_name(i: int) -> str:
    return f"shard_{i:05d}.safetensors"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def input_ids_sha256(input_ids_NT: torch.Tensor) -> str:
    """sha256 of the [N, T] ids as little-endian int32 together with their shape."""
    ids = input_ids_NT.to("cpu", torch.int32).contiguous()
    h = hashlib.sha256(f"{tuple(ids.shape)}".encode())
    h.update(ids.numpy().astype("<i4", copy=False).tobytes())
    return "sha256:" + h.hexdigest()


# ---------------------------------------------------------------------------------------------------- manifest
def _is_int(v, lo: int = 1) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= lo


_FIELDS = {  # name -> (check, what is allowed)
    "format": (lambda v: v == FORMAT, repr(FORMAT)),
    "format_version": (lambda v: v == FORMAT_VERSION, str(FORMAT_VERSION)),
    "teacher_id": (lambda v: isinstance(v, str) and v != "", "a non-empty string"),
    "fingerprint": (lambda v: v is None or isinstance(v, str), "a string or null"),
    "vocab_size": (_is_int, "a positive int"),
    "k": (_is_int, "a positive int"),
    "dtype": (lambda v: v in VALUE_DTYPES, f"one of {sorted(VALUE_DTYPES)}"),
    "ids_dtype": (lambda v: v in ("uint16", "int32"), "'uint16' or 'int32'"),
    "seq_len": (_is_int, "a positive int"),
    "num_sequences": (_is_int, "a positive int"),
    "shard_size": (_is_int, "a positive int"),
    "input_ids_sha256": (lambda v: isinstance(v, str) and v.startswith("sha256:"), "'sha256:<hex>'"),
    "shards": (lambda v: isinstance(v, list), "a list"),
}


def check_manifest(m, where: Path, *, complete: bool) -> dict:
    """Validate a manifest's fields and shard list (all shards present when `complete`); errors name the field."""
    if not isinstance(m, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(m).__name__}")
    for name, (ok, allowed) in _FIELDS.items():
        if name not in m:
            raise ValueError(f"{where}: missing field {name!r}")
        if not ok(m[name]):
            raise ValueError(f"{where}: field {name!r} must be {allowed}, got {m[name]!r}")
    if m["k"] > m["vocab_size"]:
        raise ValueError(f"{where}: field 'k' must be <= vocab_size={m['vocab_size']}, got {m['k']}")
    if m["ids_dtype"] != ids_dtype_for(m["vocab_size"]):
        raise ValueError(f"{where}: field 'ids_dtype' must be {ids_dtype_for(m['vocab_size'])!r} for "
                         f"vocab_size={m['vocab_size']}, got {m['ids_dtype']!r}")
    N, S = m["num_sequences"], m["shard_size"]
    n_shards, last = math.ceil(N / S), -1
    for j, e in enumerate(m["shards"]):
        at = f"{where}: shards[{j}]"
        if not isinstance(e, dict) or not _is_int(e.get("start"), 0) or e["start"] % S or e["start"] >= N:
            raise ValueError(f"{at}: field 'start' must be a multiple of shard_size={S} below {N}, got "
                             f"{e.get('start') if isinstance(e, dict) else e!r}")
        i = e["start"] // S
        want = {"file": shard_name(i), "count": min(S, N - e["start"])}
        for name, v in want.items():
            if e.get(name) != v:
                raise ValueError(f"{at}: field {name!r} must be {v!r}, got {e.get(name)!r}")
        if not _is_int(e.get("bytes")):
            raise ValueError(f"{at}: field 'bytes' must be a positive int, got {e.get('bytes')!r}")
        sha = e.get("sha256")
        if not isinstance(sha, str) or len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
            raise ValueError(f"{at}: field 'sha256' must be 64 lowercase hex digits, got {sha!r}")
        if i <= last:
            raise ValueError(f"{at}: shards must be listed once each, in order of 'start'; {shard_name(i)} comes "
                             f"after {shard_name(last)}")
        last = i
    if complete and len(m["shards"]) != n_shards:
        raise ValueError(f"{where}: lists {len(m['shards'])} of {n_shards} shards; the write was interrupted, rerun "
                         f"write_logit_cache with the same arguments to finish it")
    return m


def read_manifest(path: Path, *, complete: bool) -> dict:
    file = path / MANIFEST
    try:
        m = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{file}: not valid JSON ({e})") from None
    return check_manifest(m, file, complete=complete)


# ---------------------------------------------------------------------------------------------------- writing
def write_logit_cache(teacher, input_ids_NT: torch.Tensor, out_dir: str | os.PathLike, *, k: int = 64,
                      dtype: str = "bfloat16", shard_size: int = 1024, batch_size: int = 8,
                      teacher_id: str | None = None, fingerprint: str | None = None,
                      progress: Callable[[int, int], None] | None = None) -> Path:
    """Run `teacher` (a dense-logit teacher, or a torch module wrapped as a `ModelTeacher`) over the packed
    dataset `input_ids_NT` in batches and write its top-k log-probs and tail mass to `out_dir`, resuming an
    interrupted write (see the module docstring). `teacher_id` / `fingerprint` default to the teacher's name
    and tokenizer fingerprint. `progress(done, total)` is called with sequence counts. Returns `out_dir`."""
    if isinstance(teacher, torch.nn.Module):
        from kdarch.distill.teachers import ModelTeacher
        teacher = ModelTeacher(teacher)
    if not callable(teacher) or not _is_int(getattr(teacher, "vocab_size", None)):
        raise ValueError(f"write_logit_cache: expected a kdarch.distill teacher (ModelTeacher, HFTeacher) or a "
                         f"torch module, got {type(teacher).__name__}")
    if not isinstance(input_ids_NT, torch.Tensor) or input_ids_NT.dim() != 2 or input_ids_NT.numel() == 0 or \
            input_ids_NT.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        got = f"{input_ids_NT.dtype} tensor of shape {tuple(input_ids_NT.shape)}" \
            if isinstance(input_ids_NT, torch.Tensor) else type(input_ids_NT).__name__
        raise ValueError(f"write_logit_cache: input_ids must be a non-empty int tensor [N, T], got {got}")
    V = teacher.vocab_size
    for name, v, lo, hi in (("k", k, 1, V), ("shard_size", shard_size, 1, None), ("batch_size", batch_size, 1, None)):
        if not _is_int(v, lo) or (hi is not None and v > hi):
            raise ValueError(f"write_logit_cache: {name} must be an int in [{lo}, {hi if hi else 'inf'}], got {v!r}")
    if dtype not in VALUE_DTYPES:
        raise ValueError(f"write_logit_cache: dtype must be one of {sorted(VALUE_DTYPES)}, got {dtype!r}")
    lo, hi = torch.aminmax(input_ids_NT)
    if lo < 0 or hi >= V:
        raise ValueError(f"write_logit_cache: token ids must lie in [0, {V}), got values in [{int(lo)}, {int(hi)}]")
    ids_NT = input_ids_NT.to("cpu", torch.int32).contiguous()
    N, T = ids_NT.shape
    out = Path(out_dir)
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION,
                "teacher_id": teacher_id if teacher_id is not None else teacher.name,
                "fingerprint": fingerprint if fingerprint is not None else getattr(teacher, "fingerprint", None),
                "vocab_size": V, "k": k, "dtype": dtype, "ids_dtype": ids_dtype_for(V), "seq_len": T,
                "num_sequences": N, "shard_size": shard_size, "input_ids_sha256": input_ids_sha256(ids_NT),
                "shards": []}
    check_manifest(manifest, out / MANIFEST, complete=False)  # e.g. an empty teacher_id
    done = _resumable_shards(out, manifest)

    def save_manifest():
        manifest["shards"] = [done[i] for i in sorted(done)]
        text = json.dumps(manifest, indent=1) + "\n"
        atomic_write(out / MANIFEST, lambda tmp: Path(tmp).write_text(text))

    save_manifest()
    n_done = sum(e["count"] for e in done.values())
    if progress is not None:
        progress(n_done, N)
    for i in range(math.ceil(N / shard_size)):
        if i in done:
            continue
        start, count = i * shard_size, min(shard_size, N - i * shard_size)
        parts = []
        for b in range(start, start + count, batch_size):
            rows_BT = ids_NT[b:min(b + batch_size, start + count)]
            signal = teacher(rows_BT.long(), torch.arange(b, b + rows_BT.shape[0])).signal
            if not isinstance(signal, torch.Tensor) or tuple(signal.shape) != (*rows_BT.shape, V):
                got = tuple(signal.shape) if isinstance(signal, torch.Tensor) else type(signal).__name__
                raise ValueError(f"write_logit_cache: the teacher must return dense logits {(*rows_BT.shape, V)}, "
                                 f"got {got}")
            tk = TopKTeacher.from_logits(signal, k)
            parts.append((tk.ids.to("cpu", getattr(torch, manifest["ids_dtype"])),
                          tk.values.to("cpu", VALUE_DTYPES[dtype]), tk.tail_mass.to("cpu", torch.float32)))
            n_done += rows_BT.shape[0]
            if progress is not None:
                progress(n_done, N)
        tensors = {"input_ids": ids_NT[start:start + count].clone(),
                   "topk_ids": torch.cat([p[0] for p in parts]), "topk_logprobs": torch.cat([p[1] for p in parts]),
                   "tail_mass": torch.cat([p[2] for p in parts])}
        file = out / shard_name(i)
        atomic_write(file, lambda tmp: save_file(tensors, tmp, metadata={"format": FORMAT}))
        done[i] = {"file": file.name, "start": start, "count": count, "bytes": file.stat().st_size,
                   "sha256": sha256_file(file)}
        save_manifest()
    return out


def _resumable_shards(out: Path, manifest: dict) -> dict[int, dict]:
    """Shards of an earlier write into `out` that can stay (listed, checksum intact), after refusing a cache
    with another identity or a foreign non-empty directory, and removing temp files of killed writes."""
    if not out.exists():
        return {}
    if not out.is_dir():
        raise ValueError(f"write_logit_cache: {out} exists and is not a directory")
    for f in out.iterdir():  # ours: ".<name>.<random>.tmp" from atomic_write
        if f.name.startswith((".shard_", f".{MANIFEST}.")) and f.name.endswith(".tmp"):
            f.unlink(missing_ok=True)
    if not (out / MANIFEST).is_file():
        if any(out.iterdir()):
            raise ValueError(f"write_logit_cache: {out} is not empty and holds no {MANIFEST}; refusing to write a "
                             f"logit cache into it")
        return {}
    old = read_manifest(out, complete=False)
    for name in IDENTITY:
        if old[name] != manifest[name]:
            raise ValueError(f"write_logit_cache: {out} holds a logit cache with {name}={old[name]!r}, this call "
                             f"has {name}={manifest[name]!r}; write to another directory or delete that one")
    kept = {}
    for e in old["shards"]:
        f = out / e["file"]
        if f.is_file() and f.stat().st_size == e["bytes"] and sha256_file(f) == e["sha256"]:
            kept[e["start"] // manifest["shard_size"]] = e
    return kept


# ---------------------------------------------------------------------------------------------------- reading
class LogitCache:
    """A finished cache directory, checked on open: manifest fields, every shard's sha256 when `verify`, the
    expected vocab size / tokenizer fingerprint when given (`VocabMismatchError`), and each shard's tensor
    names, shapes and dtypes when it is loaded. Shards load lazily; the last `max_loaded_shards` stay in memory."""

    def __init__(self, path: str | os.PathLike, *, expect_vocab_size: int | None = None,
                 expect_fingerprint: str | None = None, verify: bool = True, max_loaded_shards: int = 4):
        self.path = Path(path)
        if not (self.path / MANIFEST).is_file():
            raise FileNotFoundError(f"LogitCache: {self.path} has no {MANIFEST} (not a logit cache directory)")
        self.manifest = m = read_manifest(self.path, complete=True)
        if expect_vocab_size is not None and expect_vocab_size != m["vocab_size"]:
            raise VocabMismatchError(f"LogitCache {self.path}: cached vocab size {m['vocab_size']} (fingerprint "
                                     f"{m['fingerprint']}), expected {expect_vocab_size}")
        if expect_fingerprint is not None and m["fingerprint"] is not None and expect_fingerprint != m["fingerprint"]:
            raise VocabMismatchError(f"LogitCache {self.path}: cached with tokenizer fingerprint {m['fingerprint']} "
                                     f"(V={m['vocab_size']}), expected {expect_fingerprint}")
        for e in m["shards"]:
            f = self.path / e["file"]
            if not f.is_file():
                raise FileNotFoundError(f"LogitCache: shard {f} is missing")
            if f.stat().st_size != e["bytes"] or (verify and sha256_file(f) != e["sha256"]):
                raise ValueError(f"LogitCache: shard {f} is corrupt (its size or sha256 differs from {MANIFEST})")
        self.max_loaded_shards = max(1, max_loaded_shards)
        self._loaded: OrderedDict[int, dict[str, torch.Tensor]] = OrderedDict()

    teacher_id = property(lambda self: self.manifest["teacher_id"])
    fingerprint = property(lambda self: self.manifest["fingerprint"])
    vocab_size = property(lambda self: self.manifest["vocab_size"])
    k = property(lambda self: self.manifest["k"])
    dtype = property(lambda self: self.manifest["dtype"])
    seq_len = property(lambda self: self.manifest["seq_len"])

    def __len__(self) -> int:
        return self.manifest["num_sequences"]

    @property
    def bytes_per_token(self) -> float:
        """On-disk bytes (manifest + shards) per cached token."""
        total = (self.path / MANIFEST).stat().st_size + sum(e["bytes"] for e in self.manifest["shards"])
        return total / (len(self) * self.seq_len)

    def get(self, indices_B) -> tuple[torch.Tensor, TopKTeacher]:
        """(input ids [B, T] int64, TopKTeacher [B, T, K] of float32 log-probs and tail mass) of the given
        sequence indices (a 1-D int tensor or a sequence of ints)."""
        idx_B = torch.as_tensor(indices_B)
        if idx_B.dim() != 1 or idx_B.numel() == 0 or idx_B.is_floating_point() or idx_B.dtype == torch.bool:
            raise ValueError(f"LogitCache.get: expected a non-empty 1-D list or tensor of sequence indices, got "
                             f"{indices_B!r}")
        idx_B = idx_B.cpu().long()
        lo, hi = torch.aminmax(idx_B)
        if lo < 0 or hi >= len(self):
            raise IndexError(f"LogitCache.get: sequence indices must lie in [0, {len(self)}), got values in "
                             f"[{int(lo)}, {int(hi)}]")
        B, T, K = idx_B.numel(), self.seq_len, self.k
        ids_BT, tids_BTK = torch.empty(B, T, dtype=torch.long), torch.empty(B, T, K, dtype=torch.long)
        vals_BTK, tail_BT = torch.empty(B, T, K), torch.empty(B, T)
        S = self.manifest["shard_size"]
        shard_B = idx_B // S
        for i in shard_B.unique().tolist():
            at_b, sh = (shard_B == i).nonzero()[:, 0], self._shard(i)
            rows = idx_B[at_b] - i * S
            ids_BT[at_b] = sh["input_ids"][rows].long()
            tids_BTK[at_b] = sh["topk_ids"][rows].long()
            vals_BTK[at_b] = sh["topk_logprobs"][rows].float()
            tail_BT[at_b] = sh["tail_mass"][rows]
        return ids_BT, TopKTeacher(tids_BTK, vals_BTK, "logprobs", tail_BT)

    def _shard(self, i: int) -> dict[str, torch.Tensor]:
        if i in self._loaded:
            self._loaded.move_to_end(i)
            return self._loaded[i]
        e, m = self.manifest["shards"][i], self.manifest
        file = self.path / e["file"]
        n, T, K = e["count"], m["seq_len"], m["k"]
        want = {"input_ids": ((n, T), torch.int32), "topk_ids": ((n, T, K), getattr(torch, m["ids_dtype"])),
                "topk_logprobs": ((n, T, K), VALUE_DTYPES[m["dtype"]]), "tail_mass": ((n, T), torch.float32)}
        sh = read_safetensors(file)
        if sh.keys() != want.keys():
            raise ValueError(f"LogitCache: shard {file} holds tensors {sorted(sh)}, expected {sorted(want)}")
        for name, (shape, dt) in want.items():
            if tuple(sh[name].shape) != shape or sh[name].dtype != dt:
                raise ValueError(f"LogitCache: shard {file}: {name} is {sh[name].dtype} {tuple(sh[name].shape)}, "
                                 f"the manifest implies {dt} {shape}")
        self._loaded[i] = sh
        if len(self._loaded) > self.max_loaded_shards:
            self._loaded.popitem(last=False)
        return sh
