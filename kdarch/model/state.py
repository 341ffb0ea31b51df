"""A CausalLM's persistent tensors, by kdarch's names: what every loader and saver above the model shares.

Three places fill a model from stored tensors — kdarch model directories (`kdarch.pretrained`), Hugging Face
DeepseekV3 checkpoints (`kdarch.convert.hf`, after renaming) and training checkpoints — and all of them must
refuse a tensor set that does not fit the config rather than load part of it, and must re-tie the head to the
embedding afterwards (safetensors stores no aliases, so a tied head is saved once, as the embedding). That
sequence lives here once: `model_from_state_dict` builds the model on the meta device (no wasted random
init), checks, loads and re-ties.
"""
from __future__ import annotations

import torch

from kdarch.config import ModelConfig
from kdarch.model.transformer import CausalLM

__all__ = ["check_state_dict", "kdarch_state_dict", "load_state_dict_into", "model_from_state_dict"]


def kdarch_state_dict(model: CausalLM) -> dict[str, torch.Tensor]:
    """Persistent tensors (detached, contiguous), with the tied head left out (safetensors stores no aliases)."""
    sd = model.state_dict()
    if model.config.tie_word_embeddings:
        sd.pop("head.weight", None)
    return {k: v.detach().contiguous() for k, v in sd.items()}


def check_state_dict(sd: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], source: str,
                     may_miss: set[str] = frozenset()) -> None:
    """Refuse missing (beyond `may_miss`), unexpected or mis-shaped tensors, naming them and `source`."""
    missing = sorted(expected.keys() - sd.keys() - may_miss)
    unexpected = sorted(sd.keys() - expected.keys())
    if missing or unexpected:
        more = lambda names: "..." if len(names) > 8 else ""  # noqa: E731
        raise ValueError(f"{source}: tensors do not match the config: missing {missing[:8]}{more(missing)}, "
                         f"unexpected {unexpected[:8]}{more(unexpected)}")
    for k, v in sd.items():
        if v.shape != expected[k].shape:
            raise ValueError(f"{source}: tensor {k}: expected shape {tuple(expected[k].shape)}, "
                             f"got {tuple(v.shape)}")


def load_state_dict_into(model: CausalLM, sd: dict[str, torch.Tensor], source: str) -> None:
    """Copy `sd` (kdarch names) into `model` after `check_state_dict`; a tied head stays tied."""
    check_state_dict(sd, kdarch_state_dict(model), source)
    model.load_state_dict(sd, strict=False)


def model_from_state_dict(cfg: ModelConfig, sd: dict[str, torch.Tensor], source: str) -> CausalLM:
    """A CausalLM (fp32 on the CPU, train mode) holding exactly `sd`: meta-device init, check, load, re-tie."""
    with torch.device("meta"):
        model = CausalLM(cfg)
    model = model.to_empty(device="cpu")
    model.init_buffers()
    load_state_dict_into(model, sd, source)
    if cfg.tie_word_embeddings:
        model.head.weight = model.embed.weight
    return model
