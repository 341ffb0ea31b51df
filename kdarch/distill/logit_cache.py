"""On-disk teacher logit cache: per token the teacher's top-k log-probs and exact tail mass, in checksummed shards.

Why: a big teacher costs more per token than the student it teaches, and the same dataset is seen for many
epochs and by many students. Running it once and keeping `TopKTeacher.from_logits` of every position (k = 64
holds nearly all of a trained model's mass, for ~260 bytes a token instead of 4·V) makes distillation cost
about as much as training the student alone.

A cache directory:
  manifest.json            `kdarch.io`'s manifest format (shared with training checkpoints): format and version,
                           identity (teacher id, tokenizer fingerprint, vocab size, k, value dtype, seq_len, number
                           of sequences, shard size, sha256 of the whole input-ids array), the finished shards
                           (file, first sequence index, count) and per file its size and sha256
  shard_00000.safetensors  input_ids [n, T] int32 (what the rows were computed on, checked by CachedTeacher),
                           topk_ids [n, T, K] uint16 when V <= 65536 else int32, topk_logprobs [n, T, K] in the
                           value dtype, tail_mass [n, T] float32
Row t of a sequence is the teacher's distribution of token t + 1. Sequence i lives in shard i // shard_size.
`CachedTeacher` serves the rows to a trainer through the same interface as a live teacher.

Crash safety and resume: every shard and the manifest are written to a temp file and renamed. The manifest is
written before the first shard and rewritten after each one, listing only finished shards with their checksums.
A rerun with the same identity keeps listed shards whose bytes still hash to the recorded sha256 and recomputes
everything else, overwriting in place (no shard is ever listed twice); a rerun with another identity is refused.

Shape legend: N sequences, T sequence length, K top-k, B looked-up sequences, n sequences in one shard.
"""
from __future__ import annotations

import hashlib
import math
import os
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import torch

from kdarch.checks import check, check_index_range, choice_arg, fail, int_arg, is_int, tensor_arg
from kdarch.distill.teacher_signal import MODES, TopKTeacher
from kdarch.distill.teachers import Teacher
from kdarch.distill.vocab import VocabMismatchError
from kdarch.io import (
    MANIFEST,
    file_record,
    read_manifest,
    read_safetensors,
    remove_temp_files,
    verify_files,
    write_manifest,
    write_safetensors,
)

__all__ = ["DEFAULT_SHARD_SIZE", "FORMAT", "FORMAT_VERSION", "MANIFEST", "VALUE_DTYPES", "CachedTeacher", "LogitCache",
           "write_logit_cache"]

FORMAT, FORMAT_VERSION = "kdarch-logit-cache", 2
VALUE_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
DEFAULT_SHARD_SIZE = 256
"""Sequences per shard file (write_logit_cache and kdarch cache-teacher): about 8.6 MB at T = 128, k = 64, bf16."""
IDENTITY = ("teacher_id", "fingerprint", "vocab_size", "k", "dtype", "ids_dtype", "seq_len", "num_sequences",
            "shard_size", "input_ids_sha256")
"""Manifest fields that must match for a rerun to resume into an existing cache."""


def ids_dtype_for(vocab_size: int) -> str:
    """Storage dtype of top-k ids: uint16 while every id fits (V <= 65536), else int32."""
    return "uint16" if vocab_size <= 1 << 16 else "int32"


def shard_name(i: int) -> str:
    return f"shard_{i:05d}.safetensors"


def input_ids_sha256(input_ids_NT: torch.Tensor) -> str:
    """sha256 of the [N, T] ids as little-endian int32 together with their shape."""
    ids = input_ids_NT.to("cpu", torch.int32).contiguous()
    h = hashlib.sha256(f"{tuple(ids.shape)}".encode())
    h.update(ids.numpy().astype("<i4", copy=False).tobytes())
    return "sha256:" + h.hexdigest()


# ---------------------------------------------------------------------------------------------------- manifest
_FIELDS = {  # name -> (check, what is allowed)
    "teacher_id": (lambda v: isinstance(v, str) and v != "", "a non-empty string"),
    "fingerprint": (lambda v: v is None or isinstance(v, str), "a string or null"),
    "vocab_size": (lambda v: is_int(v) and v >= 1, "an int >= 1"),
    "k": (lambda v: is_int(v) and v >= 1, "an int >= 1"),
    "dtype": (lambda v: v in VALUE_DTYPES, "one of " + ", ".join(map(repr, VALUE_DTYPES))),
    "ids_dtype": (lambda v: v in ("uint16", "int32"), "'uint16' or 'int32'"),
    "seq_len": (lambda v: is_int(v) and v >= 1, "an int >= 1"),
    "num_sequences": (lambda v: is_int(v) and v >= 1, "an int >= 1"),
    "shard_size": (lambda v: is_int(v) and v >= 1, "an int >= 1"),
    "input_ids_sha256": (lambda v: isinstance(v, str) and v.startswith("sha256:"), "'sha256:<hex>'"),
    "shards": (lambda v: isinstance(v, list), "a list"),
}


def check_manifest(m: dict, where: Path, *, complete: bool) -> dict:
    """Validate a manifest's identity fields and shard list against its file records (all shards present when
    `complete`); errors name the manifest and the field."""
    for name, (ok, allowed) in _FIELDS.items():
        check(name in m and ok(m[name]), f"{where}: {name}", allowed, m.get(name, "nothing"))
    check(m["k"] <= m["vocab_size"], f"{where}: k", f"an int <= vocab_size={m['vocab_size']}", m["k"])
    check(m["ids_dtype"] == ids_dtype_for(m["vocab_size"]), f"{where}: ids_dtype",
          f"{ids_dtype_for(m['vocab_size'])!r} for vocab_size={m['vocab_size']}", m["ids_dtype"])
    N, S = m["num_sequences"], m["shard_size"]
    n_shards, last = math.ceil(N / S), -1
    for j, e in enumerate(m["shards"]):
        at = f"{where}: shards[{j}]"
        start = e.get("start") if isinstance(e, dict) else None
        check(is_int(start) and 0 <= start < N and start % S == 0, f"{at}.start",
              f"a multiple of shard_size={S} below {N}", start if isinstance(e, dict) else e)
        i = start // S
        for name, want in (("file", shard_name(i)), ("count", min(S, N - start))):
            check(e.get(name) == want, f"{at}.{name}", repr(want), e.get(name))
        check(e["file"] in m["files"], f"{at}.file", "a file listed under 'files' with its size and sha256",
              e["file"])
        if i <= last:
            fail(f"{at}", f"shards listed once each, in order of start; {shard_name(i)} comes after "
                          f"{shard_name(last)}")
        last = i
    extra = sorted(set(m["files"]) - {e["file"] for e in m["shards"]})
    check(not extra, f"{where}: files", "only the listed shards", extra)
    if complete and len(m["shards"]) != n_shards:
        fail(f"{where}: shards", f"all {n_shards} shards; it lists {len(m['shards'])}: the write was interrupted, "
                                 f"rerun write_logit_cache with the same arguments to finish it")
    return m


def _read_cache_manifest(path: Path, *, complete: bool) -> dict:
    return check_manifest(read_manifest(path, FORMAT, FORMAT_VERSION), path / MANIFEST, complete=complete)


# ---------------------------------------------------------------------------------------------------- writing
def write_logit_cache(teacher: Teacher, input_ids_NT: torch.Tensor, out_dir: str | os.PathLike, *, k: int = 64,
                      dtype: str = "bfloat16", shard_size: int = DEFAULT_SHARD_SIZE, batch_size: int = 8,
                      teacher_id: str | None = None, fingerprint: str | None = None,
                      progress: Callable[[int, int], None] | None = None) -> Path:
    """Run `teacher` (a kdarch.distill Teacher giving dense logits: ModelTeacher, HFTeacher) over the packed
    dataset `input_ids_NT` in batches and write its top-k log-probs and tail mass to `out_dir`, resuming an
    interrupted write (see the module docstring). `teacher_id` / `fingerprint` default to the teacher's name
    and tokenizer fingerprint. `progress(done, total)` is called with sequence counts. Returns `out_dir`."""
    check(isinstance(teacher, Teacher), "write_logit_cache: teacher",
          "a kdarch.distill Teacher (ModelTeacher(model), HFTeacher(path), load_teacher(path))", teacher,
          error=TypeError)
    tensor_arg("write_logit_cache: input_ids", input_ids_NT, dim=2, nonempty=True,
               dtypes=(torch.int64, torch.int32, torch.int16, torch.uint8), what="a non-empty int tensor [N, T]")
    V = teacher.vocab_size
    int_arg("write_logit_cache: k", k, min=1, max=V)
    int_arg("write_logit_cache: shard_size", shard_size, min=1)
    int_arg("write_logit_cache: batch_size", batch_size, min=1)
    choice_arg("write_logit_cache: dtype", dtype, VALUE_DTYPES)
    check_index_range("write_logit_cache: input_ids", input_ids_NT, V, what="token ids")
    ids_NT = input_ids_NT.to("cpu", torch.int32).contiguous()
    N, T = ids_NT.shape
    out = Path(out_dir)
    manifest = {"teacher_id": teacher_id if teacher_id is not None else teacher.name,
                "fingerprint": fingerprint if fingerprint is not None else teacher.fingerprint,
                "vocab_size": V, "k": k, "dtype": dtype, "ids_dtype": ids_dtype_for(V), "seq_len": T,
                "num_sequences": N, "shard_size": shard_size, "input_ids_sha256": input_ids_sha256(ids_NT),
                "shards": [], "files": {}}
    if callable(getattr(teacher, "figures", None)):  # what the report's teacher row shows for a cached teacher
        manifest["teacher_figures"] = teacher.figures()
    check_manifest(manifest, out / MANIFEST, complete=False)  # e.g. an empty teacher_id
    done = _resumable_shards(out, manifest)

    def save_manifest():
        shards = [done[i] for i in sorted(done)]
        manifest["shards"] = [{k: e[k] for k in ("file", "start", "count")} for e in shards]
        write_manifest(out, FORMAT, FORMAT_VERSION, {k: v for k, v in manifest.items() if k != "files"},
                       files={e["file"]: e["record"] for e in shards})

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
                fail("write_logit_cache: the teacher's signal", f"dense logits of shape {(*rows_BT.shape, V)}",
                     signal if isinstance(signal, torch.Tensor) else type(signal).__name__)
            tk = TopKTeacher.from_logits(signal, k)
            parts.append((tk.ids.to("cpu", getattr(torch, manifest["ids_dtype"])),
                          tk.values.to("cpu", VALUE_DTYPES[dtype]), tk.tail_mass.to("cpu", torch.float32)))
            n_done += rows_BT.shape[0]
            if progress is not None:
                progress(n_done, N)
        tensors = {"input_ids": ids_NT[start:start + count].clone(),
                   "topk_ids": torch.cat([p[0] for p in parts]), "topk_logprobs": torch.cat([p[1] for p in parts]),
                   "tail_mass": torch.cat([p[2] for p in parts])}
        file = write_safetensors(out / shard_name(i), tensors, metadata={"format": FORMAT})
        done[i] = {"file": file.name, "start": start, "count": count, "record": file_record(file)}
        save_manifest()
    return out


def _resumable_shards(out: Path, manifest: dict) -> dict[int, dict]:
    """Shards of an earlier write into `out` that can stay (listed, size and checksum intact), after refusing a
    cache with another identity or a foreign non-empty directory, and removing temp files of killed writes."""
    if not out.exists():
        return {}
    if not out.is_dir():
        raise ValueError(f"write_logit_cache: {out} exists and is not a directory")
    remove_temp_files(out)
    if not (out / MANIFEST).is_file():
        if any(out.iterdir()):
            raise ValueError(f"write_logit_cache: {out} is not empty and holds no {MANIFEST}; refusing to write a "
                             f"logit cache into it")
        return {}
    old = _read_cache_manifest(out, complete=False)
    for name in IDENTITY:
        if old[name] != manifest[name]:
            raise ValueError(f"write_logit_cache: {out} holds a logit cache with {name}={old[name]!r}, this call "
                             f"has {name}={manifest[name]!r}; write to another directory or delete that one")
    kept = {}
    for e in old["shards"]:
        try:
            verify_files(out, old, [e["file"]])
        except (OSError, ValueError):
            continue  # lost or corrupt: recomputed
        kept[e["start"] // manifest["shard_size"]] = {**e, "record": old["files"][e["file"]]}
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
            raise FileNotFoundError(f"LogitCache: {self.path}: expected a logit cache directory (with {MANIFEST}), "
                                    f"got a path without one")
        self.manifest = m = _read_cache_manifest(self.path, complete=True)
        if expect_vocab_size is not None and expect_vocab_size != m["vocab_size"]:
            raise VocabMismatchError(f"LogitCache {self.path}: cached vocab size {m['vocab_size']} (fingerprint "
                                     f"{m['fingerprint']}), expected {expect_vocab_size}")
        if expect_fingerprint is not None and m["fingerprint"] is not None and expect_fingerprint != m["fingerprint"]:
            raise VocabMismatchError(f"LogitCache {self.path}: cached with tokenizer fingerprint {m['fingerprint']} "
                                     f"(V={m['vocab_size']}), expected {expect_fingerprint}")
        verify_files(self.path, m, hash=verify)
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

    def figures(self) -> dict:
        """The report's row of a cached teacher: what the cache recorded of the teacher when it was written
        (parameters, KV bytes / token, dtype; none for a teacher without sizes) and the cache's own shape."""
        m = self.manifest
        return {**m.get("teacher_figures", {}), "cache_k": m["k"], "cache_dtype": m["dtype"],
                "cache_sequences": m["num_sequences"], "cache_seq_len": m["seq_len"],
                "cache_bytes_per_token": self.bytes_per_token}

    @property
    def bytes_per_token(self) -> float:
        """On-disk bytes (manifest + shards) per cached token."""
        total = (self.path / MANIFEST).stat().st_size + sum(r["bytes"] for r in self.manifest["files"].values())
        return total / (len(self) * self.seq_len)

    def get(self, indices_B) -> tuple[torch.Tensor, TopKTeacher]:
        """(input ids [B, T] int64, TopKTeacher [B, T, K] of float32 log-probs and tail mass) of the given
        sequence indices (a 1-D int tensor or a sequence of ints)."""
        idx_B = torch.as_tensor(indices_B)
        if idx_B.dim() != 1 or idx_B.numel() == 0 or idx_B.is_floating_point() or idx_B.dtype == torch.bool:
            fail("LogitCache.get: indices", "a non-empty 1-D list or tensor of sequence indices", indices_B)
        idx_B = idx_B.cpu().long()
        lo, hi = torch.aminmax(idx_B)  # the indices pick files to read: always checked
        if lo < 0 or hi >= len(self):
            fail("LogitCache.get: indices", f"sequence indices in [0, {len(self)})", int(lo) if lo < 0 else int(hi),
                 error=IndexError)
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
        check(sh.keys() == want.keys(), f"LogitCache: {file}", f"the tensors {sorted(want)}", sorted(sh))
        for name, (shape, dt) in want.items():
            tensor_arg(f"LogitCache: {file}: {name}", sh[name], dtypes=(dt,), shape=shape,
                       what=f"{dt} {shape} (from the manifest)")
        self._loaded[i] = sh
        if len(self._loaded) > self.max_loaded_shards:
            self._loaded.popitem(last=False)
        return sh


class CachedTeacher(Teacher):
    """Rows of a `LogitCache`, looked up by dataset sequence index. The batch's token ids must equal the ids the
    cache was computed on (a prefix of each cached sequence is fine: causal rows do not see later tokens);
    anything else means a cache made for other data or another tokenizer, and is refused."""

    def __init__(self, cache: LogitCache | str | os.PathLike, *, mode: str = "tail"):
        choice_arg("CachedTeacher: mode", mode, MODES)
        self.cache = cache if isinstance(cache, LogitCache) else LogitCache(cache)
        self.mode = mode
        super().__init__(self.cache.teacher_id, self.cache.fingerprint, self.cache.vocab_size)

    def _run(self, input_ids_BT, indices_B, hidden_states):
        if hidden_states:
            raise ValueError("CachedTeacher: a logit cache holds no hidden states; use a model teacher for "
                             "feature distillation")
        if indices_B is None:
            raise ValueError("CachedTeacher: indices_B: expected the dataset sequence index of every batch row, "
                             "got None")
        B, T = input_ids_BT.shape
        cached_BS, tk = self.cache.get(indices_B)
        check(cached_BS.shape[0] == B, "CachedTeacher: indices_B", f"one index per batch row ({B})",
              cached_BS.shape[0])
        check(T <= self.cache.seq_len, "CachedTeacher: input_ids",
              f"at most the cache's {self.cache.seq_len} tokens per sequence", T)
        bad_B = (cached_BS[:, :T] != input_ids_BT.cpu().long()).any(1)  # host data either way: the cache is on disk
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
