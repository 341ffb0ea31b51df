"""Files on disk: the one place kdarch writes and reads them, atomically, checksummed, never through pickle.

Everything kdarch keeps — model directories, training checkpoints, logit caches, reports — is safetensors plus
JSON, written so that a crash at any moment leaves either the old state or the complete new one:

- a file is written to a hidden temp name beside its final one, fsynced, renamed over it, and the directory
  fsynced (`atomic_write`, `write_text`, `write_json`, `write_safetensors`);
- a set of files is written into a hidden temp directory that is fsynced and renamed into place as a whole
  (`atomic_directory`); a directory is deleted by first renaming it out of sight (`discard_directory`);
- a directory that must prove itself complete and intact carries a **manifest** (`manifest.json`): its
  format name and version, the caller's fields, and per file its size and sha256 (`file_record`). It is
  written after the files it lists, so its presence means they were complete, and `verify_files` names the
  file whose bytes no longer match. Checkpoints and logit caches both use it.

Temp names are `.<final name>.<random>.tmp`; `remove_temp_files` clears those a killed writer left behind.
Reading never unpickles: `read_safetensors` and `read_json` turn unreadable files into one-line errors that
name the file.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

__all__ = ["MANIFEST", "atomic_directory", "atomic_write", "discard_directory", "file_record", "fsync_dir",
           "read_json", "read_manifest", "read_safetensors", "remove_temp_files", "sha256_file", "verify_files",
           "write_json", "write_manifest", "write_safetensors", "write_text"]

MANIFEST = "manifest.json"
_TEMP = re.compile(r"\..+\.[^.]+\.tmp")


# --- bytes and checksums --------------------------------------------------------------------------------------
def sha256_file(path: str | os.PathLike, *, sync: bool = False) -> str:
    """Hex sha256 of a file's bytes; with sync, also flush the file to disk."""
    h = hashlib.sha256()
    with open(path, "r+b" if sync else "rb") as f:
        while block := f.read(1 << 24):
            h.update(block)
        if sync:
            os.fsync(f.fileno())
    return h.hexdigest()


def fsync_dir(directory: str | os.PathLike) -> None:
    """Make a directory's entries (renames, new files) durable; a no-op where directories cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


# --- single files -----------------------------------------------------------------------------------------------
def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call write(tmp) for a temp file beside `path`, fsync it, rename it over `path`, fsync the directory."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp)
    try:
        write(tmp)
        _fsync_file(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)
    return path


def write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def write_json(path: str | os.PathLike, obj: Any, indent: int | None = 1) -> Path:
    return write_text(path, json.dumps(obj, indent=indent) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    """The JSON document in `path`; a missing or malformed file is a one-line error naming it."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a readable JSON file ({e})") from None


def write_safetensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor],
                      metadata: dict[str, str] | None = None) -> Path:
    """Atomically write tensors (contiguous, on the CPU, none sharing memory) as a safetensors file."""
    return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def read_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file, on the CPU; an unreadable file is a one-line error naming it."""
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from None


# --- directories ------------------------------------------------------------------------------------------------
def discard_directory(directory: str | os.PathLike) -> None:
    """Rename a directory out of sight (atomic), then delete it: a crash never leaves half of it visible."""
    directory = Path(directory)
    trash = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.", suffix=".tmp"))
    os.replace(directory, trash)
    shutil.rmtree(trash, ignore_errors=True)


@contextmanager
def atomic_directory(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a hidden temp directory beside `final` to write into; on success fsync every file in it and
    rename it to `final` (replacing an existing one), on an error delete it."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp"))
    try:
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file():
                _fsync_file(f)
        fsync_dir(tmp)
        if final.exists():
            discard_directory(final)
        os.replace(tmp, final)
        fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove_temp_files(directory: str | os.PathLike) -> None:
    """Delete the temp files and directories (`.<name>.<random>.tmp`) that killed writers left in `directory`."""
    directory = Path(directory)
    for entry in directory.iterdir() if directory.is_dir() else ():
        if _TEMP.fullmatch(entry.name):
            shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)


# --- manifests --------------------------------------------------------------------------------------------------
def file_record(path: str | os.PathLike, *, sync: bool = False) -> dict[str, Any]:
    """A manifest entry for one file: {"bytes": size, "sha256": hex digest}."""
    return {"bytes": os.path.getsize(path), "sha256": sha256_file(path, sync=sync)}


def write_manifest(directory: str | os.PathLike, fmt: str, version: int, fields: dict[str, Any],
                   files: dict[str, dict[str, Any]]) -> Path:
    """Atomically write `directory/manifest.json`: format, version, the caller's fields, and `files`
    ({name: file_record(...)} of the files it vouches for)."""
    clash = sorted(fields.keys() & {"format", "format_version", "files"})
    if clash:
        raise ValueError(f"write_manifest: fields {clash} are the manifest's own")
    return write_json(Path(directory) / MANIFEST, {"format": fmt, "format_version": version, **fields,
                                                   "files": files})


def _valid_record(r: Any) -> bool:
    return (isinstance(r, dict) and r.keys() == {"bytes", "sha256"} and isinstance(r["bytes"], int)
            and not isinstance(r["bytes"], bool) and r["bytes"] >= 0 and isinstance(r["sha256"], str)
            and re.fullmatch(r"[0-9a-f]{64}", r["sha256"]) is not None)


def read_manifest(directory: str | os.PathLike, fmt: str, version: int, *, required=()) -> dict[str, Any]:
    """The manifest of `directory`, checked: a JSON object of format `fmt` at `version` with the `required`
    fields and a well-formed `files` map; each failure names the manifest and the field."""
    file = Path(directory) / MANIFEST
    if not file.is_file():
        raise FileNotFoundError(f"{directory}: has no {MANIFEST} (not a {fmt} directory, or an incomplete one)")
    m = read_json(file)
    if not isinstance(m, dict) or m.get("format") != fmt:
        got = m.get("format") if isinstance(m, dict) else type(m).__name__
        raise ValueError(f"{file}: format: expected {fmt!r}, got {got!r}")
    if m.get("format_version") != version:
        raise ValueError(f"{file}: format_version: expected {version} (what this kdarch reads), got "
                         f"{m.get('format_version')!r}; write it again with this version of kdarch")
    missing = [k for k in ("files", *required) if k not in m]
    if missing:
        raise ValueError(f"{file}: expected the fields {sorted(missing)}, which are missing")
    files = m["files"]
    if not isinstance(files, dict) or not all(isinstance(k, str) and _valid_record(r) for k, r in files.items()):
        raise ValueError(f"{file}: files: expected a map of file name -> {{bytes, sha256}}, got {files!r:.200}")
    return m


def verify_files(directory: str | os.PathLike, manifest: dict[str, Any], names=None, *, hash: bool = True) -> None:
    """Every file the manifest lists (or just `names`) exists with its recorded size and (with hash) sha256;
    else an error naming the file."""
    directory = Path(directory)
    for name in manifest["files"] if names is None else names:
        record, path = manifest["files"].get(name), directory / name
        if record is None:
            raise ValueError(f"{directory / MANIFEST}: lists no {name}; the directory is incomplete")
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing (listed in {MANIFEST})")
        if path.stat().st_size != record["bytes"] or (hash and sha256_file(path) != record["sha256"]):
            raise ValueError(f"{path}: corrupt (its size or sha256 differs from {MANIFEST})")
