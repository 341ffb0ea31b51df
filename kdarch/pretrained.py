"""Saving and loading model directories: kdarch's own format and Hugging Face DeepseekV3 checkpoints.

A kdarch directory holds `config.json` (`"model_type": "kdarch"` plus the ModelConfig fields) and
`model.safetensors`. A Hugging Face directory holds `config.json` with `"model_type": "deepseek_v3"` and
one or more safetensors files; `kdarch.convert.hf` maps it. Weights are only ever read from safetensors,
never from pickles, and files are written to a temporary name and renamed, so a killed save never
leaves a half-written checkpoint behind.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from kdarch.config import ModelConfig

KDARCH_MODEL_TYPE = "kdarch"
WEIGHTS_NAME = "model.safetensors"


def atomic_write(path: Path, write) -> None:
    """Call write(tmp_path) for a temp file beside `path`, then rename it over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def kdarch_state_dict(model) -> dict[str, torch.Tensor]:
    """Persistent tensors, with the tied head left out (safetensors stores no aliases)."""
    sd = model.state_dict()
    if model.config.tie_word_embeddings:
        sd.pop("head.weight", None)
    return {k: v.detach().contiguous() for k, v in sd.items()}


def save_pretrained(model, path: str | os.PathLike, format: str = "kdarch") -> Path:
    """Write `model` to directory `path` as kdarch's format ("kdarch") or a Hugging Face DeepseekV3 one ("hf")."""
    path = Path(path)
    if format == "hf":
        from kdarch.convert.hf import save_hf
        save_hf(model, path)
        return path
    if format != "kdarch":
        raise ValueError(f"save_pretrained: format must be 'kdarch' or 'hf', got {format!r}")
    config = {"model_type": KDARCH_MODEL_TYPE, **model.config.to_dict()}
    atomic_write(path / WEIGHTS_NAME, lambda tmp: save_file(kdarch_state_dict(model), tmp, metadata={"format": "pt"}))
    atomic_write(path / "config.json", lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2) + "\n"))
    return path


def read_safetensors(file: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(file))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{file}: not a readable safetensors file ({e})") from None


def check_state_dict(sd: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], source: str,
                     may_miss: set[str] = frozenset()) -> None:
    """Refuse missing (beyond `may_miss`), unexpected or mis-shaped tensors, naming them."""
    missing = sorted(expected.keys() - sd.keys() - may_miss)
    unexpected = sorted(sd.keys() - expected.keys())
    if missing or unexpected:
        raise ValueError(f"{source}: tensors do not match the config: missing {missing[:8]}"
                         f"{'...' if len(missing) > 8 else ''}, unexpected {unexpected[:8]}"
                         f"{'...' if len(unexpected) > 8 else ''}")
    for k, v in sd.items():
        if v.shape != expected[k].shape:
            raise ValueError(f"{source}: tensor {k} has shape {tuple(v.shape)}, the config expects "
                             f"{tuple(expected[k].shape)}")


def load_state_dict_into(model, sd: dict[str, torch.Tensor], source: str) -> None:
    """Copy `sd` into `model` after `check_state_dict`."""
    check_state_dict(sd, kdarch_state_dict(model), source)
    model.load_state_dict(sd, strict=False)


def from_pretrained(path: str | os.PathLike, *, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"):
    """Load a kdarch or Hugging Face DeepseekV3 model directory into a `kdarch.CausalLM`."""
    from kdarch.model import CausalLM

    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"from_pretrained: {path} has no config.json (expected a kdarch or Hugging Face "
                                f"DeepseekV3 model directory)")
    try:
        raw = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_file}: not valid JSON: {e}") from None
    model_type = raw.get("model_type")
    if model_type == "deepseek_v3":
        from kdarch.convert.hf import load_hf
        model = load_hf(path)
    elif model_type == KDARCH_MODEL_TYPE:
        cfg = ModelConfig.from_dict({k: v for k, v in raw.items() if k != "model_type"})
        with torch.device("meta"):
            model = CausalLM(cfg)
        model = model.to_empty(device="cpu")
        model.init_buffers()
        weights = path / WEIGHTS_NAME
        if not weights.is_file():
            raise FileNotFoundError(f"from_pretrained: {path} has no {WEIGHTS_NAME}")
        load_state_dict_into(model, read_safetensors(weights), str(weights))
        if cfg.tie_word_embeddings:
            model.head.weight = model.embed.weight
    else:
        raise ValueError(f"{cfg_file}: model_type must be 'kdarch' or 'deepseek_v3', got {model_type!r}")
    return model.to(device=device, dtype=dtype) if dtype is not None else model.to(device)
