"""GGUF files as teachers: import a .gguf once into a Hugging Face model directory, then use it like any other.

GGUF is the format most local models ship in (llama.cpp and its kin): one file with quantised tensors, the
architecture's hyper-parameters and the tokenizer. transformers reads it (`gguf_file=`, with the `gguf`
package) and dequantises every tensor to float, rebuilding the model class of its architecture (Gemma-3,
Llama, Qwen, ...) and a fast tokenizer from the file's vocabulary. That takes tens of seconds for a 270M model
(most of it building the tokenizer), and a distillation run loads its teacher more than once, so the result is
written once as an ordinary directory — config.json, safetensors weights in the dequantised float32, the
tokenizer files — and every later load is a plain `from_pretrained` of that directory. The directory is also
what a student needs to share the teacher's tokenizer (its tokenizer.json).

The directory lives in the import cache (`$KDARCH_CACHE/gguf`, default `~/.cache/kdarch/gguf`), named after
the file and the sha256 of its bytes, so an edited or replaced file is imported afresh; it is written to a
temporary directory and renamed, so an interrupted import never leaves a directory that looks complete.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from kdarch.checks import optional_import
from kdarch.io import atomic_directory, read_json, sha256_file, write_json, write_safetensors

__all__ = ["GGUF_SUFFIX", "gguf_cache_dir", "import_gguf", "is_gguf"]

log = logging.getLogger(__name__)

GGUF_SUFFIX = ".gguf"
_MAGIC = b"GGUF"
_IMPORTED = "gguf_source.json"
"""Written last into an imported directory: the file it came from (name, size, sha256)."""


def is_gguf(path: str | os.PathLike) -> bool:
    """A file named *.gguf (whether its contents are one is checked on import)."""
    path = Path(path)
    return path.suffix.lower() == GGUF_SUFFIX and path.is_file()


def gguf_cache_dir() -> Path:
    root = os.environ.get("KDARCH_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "kdarch") / "gguf"


def import_gguf(path: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
    """The Hugging Face directory of the GGUF file `path`: imported on the first call, found in `cache_dir`
    (default `gguf_cache_dir()`) afterwards. Raises ValueError when the file is not GGUF, ImportError naming the
    extra when transformers / gguf / accelerate are missing."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"import_gguf: expected a .gguf file, got {str(path)!r}, which does not exist")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != _MAGIC:
        raise ValueError(f"import_gguf: {path}: expected a GGUF file (starting with the bytes {_MAGIC!r}), got one "
                         f"starting with {magic!r}")
    digest = sha256_file(path)
    target = Path(cache_dir if cache_dir is not None else gguf_cache_dir()) / f"{path.stem}-{digest[:16]}"
    if (target / _IMPORTED).is_file() and read_json(target / _IMPORTED).get("sha256") == digest:
        return target
    transformers = optional_import("transformers", extra="gguf", purpose="A GGUF teacher")
    for module in ("gguf", "accelerate"):  # transformers' GGUF reader needs both
        optional_import(module, extra="gguf", purpose="A GGUF teacher")
    log.warning("importing %s into %s (dequantised to float32; once per file)", path, target)
    folder, name = str(path.parent), path.name
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    with atomic_directory(target) as tmp:
        _save_dequantised(model, tmp)
        tokenizer.save_pretrained(tmp)
        write_json(tmp / _IMPORTED, {"file": name, "bytes": path.stat().st_size, "sha256": digest,
                                     "architecture": type(model).__name__})
    return target


def _save_dequantised(model, directory: Path) -> None:
    """config.json (without the GGUF quantisation record: the weights are plain floats now) and model.safetensors,
    one copy of each tied tensor (from_pretrained ties them again). transformers' own save_pretrained refuses a
    model it loaded from GGUF, although after dequantisation nothing quantised is left."""
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    write_json(directory / "config.json", config)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(directory)
    seen, tensors = set(), {}
    for key, t in model.state_dict().items():
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        tensors[key] = t.detach().contiguous().cpu()
    write_safetensors(directory / "model.safetensors", tensors, metadata={"format": "pt"})
