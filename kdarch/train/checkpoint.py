"""Training checkpoints with exact resume: a run killed at any moment and resumed from its latest checkpoint
reproduces the uninterrupted run's losses bit for bit (on the CPU).

A checkpoint is the directory `run_dir/checkpoints/step_{step:08d}/`. Each file exists because the next
update depends on it:
- `model.safetensors` + `config.json` (written by `save_pretrained`): weights and persistent buffers. The MoE
  router's selection bias is such a buffer; it moves every step and decides which experts a token reaches.
  The directory therefore also loads with `kdarch.from_pretrained`.
- `modules.json` + `modules.safetensors`: extra trainable modules trained beside the model (a feature-KD
  projector), by name.
- `optimizer.json` + `optimizer.safetensors`: the optimiser's tensors (AdamW moments and step counts) as
  `state.{param_index}.{key}`, and in JSON everything else (each param group's hyper-parameters).
- `scheduler.json`: the LR schedule's position.
- `rng.json` + `rng.safetensors`: the torch CPU (and CUDA, when initialised), Python `random` and NumPy
  generator states, so the batches drawn after a resume are the ones the uninterrupted run drew.
- `state.json` (+ `state.safetensors`): the caller's own state (data position, counters, metrics).
- `manifest.json` (`kdarch.io`'s manifest format, shared with the logit cache): step, model config, format
  version and the size and sha256 of every other file. It is written last and checked on load, so a corrupt
  or truncated file is named instead of being trained on.

The set is written into a hidden temp directory beside the final one, fsynced and renamed into place
(`kdarch.io.atomic_directory`): a crash leaves either the previous checkpoints or the new complete one, never
a half one with the final name. One process writes a run directory (rank 0); leftover temp directories from a
killed save are removed by the next save. No pickle anywhere: tensors go to safetensors, the rest to JSON;
tuples, non-string dict keys and tensors inside state dicts are encoded explicitly, so they come back with the
same types.
"""
from __future__ import annotations

import json
import os
import random
import re
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdarch.checks import int_arg
from kdarch.config import ModelConfig
from kdarch.io import (
    MANIFEST,
    atomic_directory,
    discard_directory,
    file_record,
    read_json,
    read_manifest,
    read_safetensors,
    remove_temp_files,
    verify_files,
    write_json,
    write_manifest,
    write_safetensors,
)
from kdarch.model.state import check_state_dict, kdarch_state_dict, load_state_dict_into
from kdarch.pretrained import WEIGHTS_NAME, save_pretrained

FORMAT, FORMAT_VERSION = "kdarch-checkpoint", 2
CHECKPOINTS = "checkpoints"
_STEP_DIR = re.compile(r"step_(\d{8,})")
_TENSOR, _TUPLE, _ITEMS = "__tensor__", "__tuple__", "__items__"
_MARKERS = {_TENSOR, _TUPLE, _ITEMS}


class CorruptCheckpointError(ValueError):
    """A checkpoint's files are missing, truncated or altered (its manifest says so): not a usable checkpoint."""


# --- state dicts as JSON + safetensors ----------------------------------------------------------
def _encode(obj: Any, name: str, tensors: dict[str, torch.Tensor]) -> Any:
    """JSON form of `obj`; each tensor moves into `tensors` under its dotted path and leaves a reference."""
    if isinstance(obj, torch.Tensor):
        if name in tensors:
            raise ValueError(f"checkpoint: two tensors would be stored under the name {name!r}")
        tensors[name] = obj.detach()
        return {_TENSOR: name}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    sub = lambda k: f"{name}.{k}" if name else str(k)  # noqa: E731
    if isinstance(obj, (list, tuple)):
        items = [_encode(v, sub(i), tensors) for i, v in enumerate(obj)]
        return {_TUPLE: items} if isinstance(obj, tuple) else items
    if isinstance(obj, dict):
        bad = [k for k in obj if not (k is None or isinstance(k, (bool, int, float, str)))]
        if bad:
            raise TypeError(f"checkpoint: {name or 'state'} has a {type(bad[0]).__name__} key; expected str, int, "
                            f"float, bool or None keys")
        if all(isinstance(k, str) for k in obj) and not obj.keys() & _MARKERS:
            return {k: _encode(v, sub(k), tensors) for k, v in obj.items()}
        return {_ITEMS: [[k, _encode(v, sub(k), tensors)] for k, v in obj.items()]}
    raise TypeError(f"checkpoint: {name or 'state'} is a {type(obj).__name__}; expected JSON values (dict, list, "
                    f"str, int, float, bool, None), tuples or tensors")


def _decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if obj.keys() == {_TENSOR}:
            return tensors[obj[_TENSOR]]
        if obj.keys() == {_TUPLE}:
            return tuple(_decode(v, tensors) for v in obj[_TUPLE])
        if obj.keys() == {_ITEMS}:
            return {k: _decode(v, tensors) for k, v in obj[_ITEMS]}
        return {k: _decode(v, tensors) for k, v in obj.items()}
    return obj


def _write_part(directory: Path, name: str, obj: Any) -> None:
    """`name.json`, plus `name.safetensors` when `obj` holds tensors."""
    tensors: dict[str, torch.Tensor] = {}
    doc = _encode(obj, "", tensors)
    if tensors:
        seen, unique = set(), {}
        for k, t in tensors.items():  # safetensors refuses tensors that share memory: copy the later ones
            t = t.contiguous()
            ptr = (t.device, t.untyped_storage().data_ptr())
            unique[k] = t.clone() if ptr in seen else t
            seen.add(ptr)
        write_safetensors(directory / f"{name}.safetensors", unique)
    write_json(directory / f"{name}.json", doc, indent=None)


def _read_part(directory: Path, name: str, files: dict[str, Any]) -> Any:
    tensors = read_safetensors(directory / f"{name}.safetensors") if f"{name}.safetensors" in files else {}
    return _decode(read_json(directory / f"{name}.json"), tensors)


# --- RNG ------------------------------------------------------------------------------------------
def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np
    except ImportError:
        return state
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state["numpy"] = (kind, keys.tolist(), int(pos), int(has_gauss), float(cached))
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state:
        if torch.cuda.is_available() and torch.cuda.device_count() == len(state["cuda"]):
            torch.cuda.set_rng_state_all(state["cuda"])
        else:
            warnings.warn(f"checkpoint holds RNG states for {len(state['cuda'])} CUDA devices, this process sees "
                          f"{torch.cuda.device_count() if torch.cuda.is_available() else 0}; CUDA RNG not restored",
                          stacklevel=2)
    if "numpy" in state:
        import numpy as np
        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


# --- files ----------------------------------------------------------------------------------------
def complete_checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, path) of the complete checkpoints, by step."""
    root = Path(run_dir) / CHECKPOINTS
    found = []
    for d in root.iterdir() if root.is_dir() else ():
        m = _STEP_DIR.fullmatch(d.name)
        if m is None or not (d / MANIFEST).is_file():
            continue
        try:
            manifest = read_json(d / MANIFEST)
            complete = manifest["step"] == int(m[1]) and all((d / f).is_file() for f in manifest["files"])
        except (OSError, ValueError, KeyError, TypeError):
            complete = False
        if complete:
            found.append((int(m[1]), d))
    return sorted(found)


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The complete checkpoint with the highest step under `run_dir`, or None (temp and incomplete ones ignored)."""
    found = complete_checkpoints(run_dir)
    return found[-1][1] if found else None


# --- save / load ------------------------------------------------------------------------------------
def _check_model(model: nn.Module) -> ModelConfig:
    cfg = getattr(model, "config", None)
    if not isinstance(model, nn.Module) or not isinstance(cfg, ModelConfig):
        raise TypeError(f"model: expected a kdarch.CausalLM (an nn.Module with a ModelConfig .config), got "
                        f"{type(model).__name__}")
    return cfg


def _check_modules(modules: dict[str, nn.Module]) -> None:
    if not isinstance(modules, dict) or not all(isinstance(k, str) and isinstance(v, nn.Module)
                                                for k, v in modules.items()):
        raise TypeError("modules: expected a dict of name (str) -> nn.Module")


def _param_shapes(optimizer: torch.optim.Optimizer) -> list[list[list[int]]]:
    return [[list(p.shape) for p in g["params"]] for g in optimizer.param_groups]


def checkpoint_path(run_dir: str | os.PathLike, step: int) -> Path:
    """Where the checkpoint of `step` lives (whether or not it exists)."""
    return Path(run_dir) / CHECKPOINTS / f"step_{step:08d}"


def save_checkpoint(run_dir: str | os.PathLike, step: int, *, model: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
                    modules: dict[str, nn.Module] = {}, state: dict[str, Any] | None = None,  # noqa: B006
                    keep_last: int | None = 3, optimizer_state: dict | None = None,
                    param_shapes: list[list[list[int]]] | None = None,
                    before_commit: Callable[[], None] | None = None) -> Path:
    """Write `run_dir/checkpoints/step_{step:08d}/` atomically, then delete the older checkpoints beyond the
    newest `keep_last` (None keeps all; the one just written always stays). `state` holds the caller's JSON
    values (tuples and tensors allowed too). Returns the checkpoint's path.

    A sharded run passes the gathered 1-process `optimizer_state` and its `param_shapes` (whole tensors) instead
    of the optimizer's own, and `before_commit`, called once every file is written and before the directory
    takes its final name (a barrier: a rank that died during the save leaves no complete checkpoint)."""
    cfg = _check_model(model)
    int_arg("step", step, min=0)
    if keep_last is not None:
        int_arg("keep_last", keep_last, min=1)
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer: expected a torch.optim.Optimizer, got {type(optimizer).__name__}")
    _check_modules(modules)
    if state is not None and not isinstance(state, dict):
        raise TypeError(f"state: expected a dict, got {type(state).__name__}")

    root = Path(run_dir) / CHECKPOINTS
    final = checkpoint_path(run_dir, step)
    with atomic_directory(final) as tmp:
        save_pretrained(model, tmp)
        _write_part(tmp, "modules", {name: m.state_dict() for name, m in modules.items()})
        _write_part(tmp, "optimizer", optimizer.state_dict() if optimizer_state is None else optimizer_state)
        if scheduler is not None:
            _write_part(tmp, "scheduler", scheduler.state_dict())
        _write_part(tmp, "rng", _rng_state())
        _write_part(tmp, "state", state or {})
        write_manifest(tmp, FORMAT, FORMAT_VERSION, {
            "step": step, "model_config": cfg.to_dict(),
            "optimizer": {"class": type(optimizer).__name__,
                          "param_shapes": param_shapes if param_shapes is not None else _param_shapes(optimizer)},
            "scheduler": type(scheduler).__name__ if scheduler is not None else None, "modules": sorted(modules)},
            files={f.name: file_record(f) for f in sorted(tmp.iterdir())})
        if before_commit is not None:
            before_commit()
    remove_temp_files(root)  # left by killed saves
    if keep_last is not None:
        older = [d for _, d in complete_checkpoints(run_dir) if d != final]
        for d in older[:max(0, len(older) - (keep_last - 1))]:
            discard_directory(d)
    return final


def load_checkpoint(path: str | os.PathLike, *, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
                    modules: dict[str, nn.Module] = {}, restore_rng: bool = True,  # noqa: B006
                    param_shapes: list[list[list[int]]] | None = None,
                    load_optimizer: Callable[[dict], None] | None = None) -> dict[str, Any]:
    """Verify the checkpoint at `path` (every file's sha256; model config, optimiser params and modules match the
    given objects), then load it into them and, with restore_rng, restore the RNG states. Nothing is changed
    when a check fails. Returns {"step": int, "state": the caller's state}. A sharded run passes the whole
    `param_shapes` of its optimizer and `load_optimizer(state_dict)`, which loads the 1-process optimizer state."""
    path = Path(path)
    cfg = _check_model(model)
    _check_modules(modules)
    try:
        manifest = read_manifest(path, FORMAT, FORMAT_VERSION,
                                 required=("step", "model_config", "optimizer", "scheduler", "modules"))
    except ValueError as e:
        raise CorruptCheckpointError(str(e)) from None
    files = manifest["files"]

    saved_cfg, model_cfg = manifest["model_config"], json.loads(json.dumps(cfg.to_dict()))
    diff = [f"{k}: checkpoint {saved_cfg.get(k, '<absent>')!r}, model {model_cfg.get(k, '<absent>')!r}"
            for k in sorted(saved_cfg.keys() | model_cfg.keys()) if saved_cfg.get(k) != model_cfg.get(k)]
    if diff:
        raise ValueError(f"load_checkpoint: {path} was written for a different model config; " + "; ".join(diff))
    if (optimizer is not None or modules) and sorted(modules) != manifest["modules"]:
        raise ValueError(f"load_checkpoint: {path} holds the modules {manifest['modules']}, given {sorted(modules)}")
    if optimizer is not None:
        saved = manifest["optimizer"]
        shapes = param_shapes if param_shapes is not None else _param_shapes(optimizer)
        if saved["class"] != type(optimizer).__name__:
            raise ValueError(f"load_checkpoint: {path} holds {saved['class']} state, given {type(optimizer).__name__}")
        counts, given = [len(g) for g in saved["param_shapes"]], [len(g) for g in shapes]
        if counts != given:
            raise ValueError(f"load_checkpoint: {path}: the optimiser had param groups of {counts} params, "
                             f"the given one has {given}")
        for gi, (a, b) in enumerate(zip(saved["param_shapes"], shapes)):
            for pi, (sa, sb) in enumerate(zip(a, b)):
                if sa != sb:
                    raise ValueError(f"load_checkpoint: {path}: optimiser param group {gi} param {pi} has shape "
                                     f"{tuple(sa)} in the checkpoint, {tuple(sb)} given")
    if scheduler is not None and manifest["scheduler"] != type(scheduler).__name__:
        raise ValueError(f"load_checkpoint: {path} holds scheduler state {manifest['scheduler']!r}, given "
                         f"{type(scheduler).__name__}")

    required = ["config.json", WEIGHTS_NAME, "modules.json", "optimizer.json", "rng.json", "state.json"]
    try:
        verify_files(path, manifest, required + ["scheduler.json"] * (manifest["scheduler"] is not None))
        verify_files(path, manifest)
    except (FileNotFoundError, ValueError) as e:  # a file listed and missing is a corrupt checkpoint too
        raise CorruptCheckpointError(str(e)) from None

    model_sd = read_safetensors(path / WEIGHTS_NAME)
    check_state_dict(model_sd, kdarch_state_dict(model), str(path / WEIGHTS_NAME))
    saved_modules = _read_part(path, "modules", files) if modules else {}
    for name, m in modules.items():
        expected = {k: v for k, v in m.state_dict().items() if isinstance(v, torch.Tensor)}
        got = {k: v for k, v in saved_modules[name].items() if isinstance(v, torch.Tensor)}
        check_state_dict(got, expected, f"{path / 'modules.safetensors'} [{name}]")
    optimizer_sd = _read_part(path, "optimizer", files) if optimizer is not None else None
    scheduler_sd = _read_part(path, "scheduler", files) if scheduler is not None else None
    rng = _read_part(path, "rng", files) if restore_rng else None
    state = _read_part(path, "state", files)

    load_state_dict_into(model, model_sd, str(path / WEIGHTS_NAME))
    for name, m in modules.items():
        m.load_state_dict(saved_modules[name])
    if optimizer is not None:
        (load_optimizer or optimizer.load_state_dict)(optimizer_sd)
    if scheduler is not None:
        scheduler.load_state_dict(scheduler_sd)
    if rng is not None:
        _set_rng_state(rng)
    return {"step": manifest["step"], "state": state}
