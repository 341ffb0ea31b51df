"""Saving and loading model directories: kdarch's own format and Hugging Face DeepseekV3 checkpoints.

A kdarch directory holds `config.json` (`"model_type": "kdarch"` plus the ModelConfig fields) and
`model.safetensors`. A Hugging Face directory holds `config.json` with `"model_type": "deepseek_v3"` and
one or more safetensors files; `kdarch.convert.hf` maps it. Both are read from safetensors only, never
from pickles, and written file by file through `kdarch.io` (temp name, fsync, rename), so a killed save
never leaves a half-written file behind.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from kdarch.checks import choice_arg
from kdarch.config import ModelConfig
from kdarch.convert.hf import HF_MODEL_TYPE, load_hf, save_hf
from kdarch.io import read_json, read_safetensors, write_json, write_safetensors
from kdarch.model import CausalLM
from kdarch.model.state import kdarch_state_dict, model_from_state_dict

__all__ = ["FORMATS", "KDARCH_MODEL_TYPE", "WEIGHTS_NAME", "from_pretrained", "save_pretrained"]

KDARCH_MODEL_TYPE = "kdarch"
WEIGHTS_NAME = "model.safetensors"
FORMATS = ("kdarch", "hf")
"""Directory formats: kdarch's own, and Hugging Face DeepseekV3 (loads in transformers)."""


def save_pretrained(model: CausalLM, path: str | os.PathLike, format: str = "kdarch") -> Path:
    """Write `model` to directory `path` in one of FORMATS: "kdarch" or "hf" (Hugging Face DeepseekV3)."""
    choice_arg("save_pretrained: format", format, FORMATS)
    path = Path(path)
    if format == "hf":
        return save_hf(model, path)
    sd = {k: v.to("cpu") for k, v in kdarch_state_dict(model).items()}
    write_safetensors(path / WEIGHTS_NAME, sd, metadata={"format": "pt"})
    write_json(path / "config.json", {"model_type": KDARCH_MODEL_TYPE, **model.config.to_dict()}, indent=2)
    return path


def from_pretrained(path: str | os.PathLike, *, dtype: torch.dtype | None = None,
                    device: str | torch.device = "cpu") -> CausalLM:
    """Load a kdarch or Hugging Face DeepseekV3 model directory into a `kdarch.CausalLM`."""
    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"from_pretrained: {path}: expected a kdarch or Hugging Face DeepseekV3 model "
                                f"directory (with config.json), got a path without one")
    raw = read_json(cfg_file)
    model_type = raw.get("model_type") if isinstance(raw, dict) else None
    if model_type == HF_MODEL_TYPE:
        model = load_hf(path)
    elif model_type == KDARCH_MODEL_TYPE:
        cfg = ModelConfig.from_dict({k: v for k, v in raw.items() if k != "model_type"})
        weights = path / WEIGHTS_NAME
        if not weights.is_file():
            raise FileNotFoundError(f"from_pretrained: {path}: expected {WEIGHTS_NAME} beside config.json")
        model = model_from_state_dict(cfg, read_safetensors(weights), str(weights))
    else:
        raise ValueError(f"{cfg_file}: model_type: expected {KDARCH_MODEL_TYPE!r} or {HF_MODEL_TYPE!r}, got "
                         f"{model_type!r}")
    return model.to(device=device, dtype=dtype) if dtype is not None else model.to(device)
