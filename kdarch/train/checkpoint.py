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
- `manifest.json`: step, model config, format version and the sha256 of every other file. It is written
  last and checked on load, so a corrupt or truncated file is named instead of being trained on.

The set is written into a hidden temp directory beside the final one, fsynced and renamed into place: a crash
leaves either the previous checkpoints or the new complete one, never a half one with the final name. One
process writes a run directory (rank 0); leftover temp directories from a killed save are removed by the
next save. No pickle anywhere: tensors go to safetensors, the rest to JSON; tuples, non-string dict keys and
tensors inside state dicts are encoded explicitly, so they come back with the same types.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from kdarch.config import ModelConfig
from kdarch.pretrained import WEIGHTS_NAME, check_state_dict, kdarch_state_dict, load_state_dict_into, \
    read_safetensors, save_pretrained

FORMAT, FORMAT_VERSION = "kdarch-checkpoint", 1
CHECKPOINTS, MANIFEST = "checkpoints", "manifest.json"
_STEP_DIR = re.compile(r"step_(\d{8,})")
_TEMP_DIR = re.compile(r"\.step_\d{8,}\..+\.tmp")
_TENSOR, _TUPLE, _ITEMS = "__tensor__", "__tuple__", "__items__"
_MARKERS = {_TENSOR, _TUPLE, _ITEMS}


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
        save_file(unique, str(directory / f"{name}.safetensors"))
    (directory / f"{name}.json").write_text(json.dumps(doc) + "\n")


def _read_json(file: Path) -> Any:
    try:
        return json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{file}: not a readable JSON file ({e})") from None


def _read_part(directory: Path, name: str, files: dict[str, str]) -> Any:
    tensors = read_safetensors(directory / f"{name}.safetensors") if f"{name}.safetensors" in files else {}
    return _decode(_read_json(directory / f"{name}.json"), tensors)


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
                          f"{torch.cuda.device_count() if torch.cuda.is_available() else 0}; CUDA RNG not restored")
    if "numpy" in state:
        import numpy as np
        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


# --- files ----------------------------------------------------------------------------------------
def _sha256(file: Path, sync: bool = False) -> str:
    """Hash of `file`; with sync, also flush it to disk."""
    h = hashlib.sha256()
    with open(file, "r+b" if sync else "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
        if sync:
            os.fsync(f.fileno())
    return h.hexdigest()


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # platforms that cannot open directories (Windows)
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _discard(directory: Path) -> None:
    """Rename a checkpoint out of sight (atomic), then delete it: a crash never leaves a half one visible."""
    trash = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.", suffix=".tmp"))
    os.replace(directory, trash)
    shutil.rmtree(trash, ignore_errors=True)


def _checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, path) of the complete checkpoints, by step."""
    root = Path(run_dir) / CHECKPOINTS
    found = []
    for d in root.iterdir() if root.is_dir() else ():
        m = _STEP_DIR.fullmatch(d.name)
        if m is None or not (d / MANIFEST).is_file():
            continue
        try:
            manifest = json.loads((d / MANIFEST).read_text())
            complete = manifest["step"] == int(m[1]) and all((d / f).is_file() for f in manifest["files"])
        except (OSError, ValueError, KeyError, TypeError):
            complete = False
        if complete:
            found.append((int(m[1]), d))
    return sorted(found)


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The complete checkpoint with the highest step under `run_dir`, or None (temp and incomplete ones ignored)."""
    found = _checkpoints(run_dir)
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


def save_checkpoint(run_dir: str | os.PathLike, step: int, *, model: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
                    modules: dict[str, nn.Module] = {}, state: dict[str, Any] | None = None,  # noqa: B006
                    keep_last: int | None = 3) -> Path:
    """Write `run_dir/checkpoints/step_{step:08d}/` atomically, then delete the older checkpoints beyond the
    newest `keep_last` (None keeps all; the one just written always stays). `state` holds the caller's JSON
    values (tuples and tensors allowed too). Returns the checkpoint's path."""
    cfg = _check_model(model)
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step: expected an int >= 0, got {step!r}")
    if keep_last is not None and (isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 1):
        raise ValueError(f"keep_last: expected an int >= 1 or None (keep all), got {keep_last!r}")
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer: expected a torch.optim.Optimizer, got {type(optimizer).__name__}")
    _check_modules(modules)
    if state is not None and not isinstance(state, dict):
        raise TypeError(f"state: expected a dict, got {type(state).__name__}")

    root = Path(run_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:08d}"
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{final.name}.", suffix=".tmp"))
    try:
        save_pretrained(model, tmp)
        _write_part(tmp, "modules", {name: m.state_dict() for name, m in modules.items()})
        _write_part(tmp, "optimizer", optimizer.state_dict())
        if scheduler is not None:
            _write_part(tmp, "scheduler", scheduler.state_dict())
        _write_part(tmp, "rng", _rng_state())
        _write_part(tmp, "state", state or {})
        manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "step": step, "model_config": cfg.to_dict(),
                    "optimizer": {"class": type(optimizer).__name__, "param_shapes": _param_shapes(optimizer)},
                    "scheduler": type(scheduler).__name__ if scheduler is not None else None,
                    "modules": sorted(modules),
                    "files": {f.name: _sha256(f, sync=True) for f in sorted(tmp.iterdir())}}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        _sha256(tmp / MANIFEST, sync=True)
        _fsync_dir(tmp)
        if final.exists():
            _discard(final)
        os.replace(tmp, final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

    for d in root.iterdir():  # temp directories left by killed saves
        if _TEMP_DIR.fullmatch(d.name):
            shutil.rmtree(d, ignore_errors=True)
    if keep_last is not None:
        older = [d for _, d in _checkpoints(run_dir) if d != final]
        for d in older[:max(0, len(older) - (keep_last - 1))]:
            _discard(d)
    return final


def _read_manifest(path: Path) -> dict[str, Any]:
    if not (path / MANIFEST).is_file():
        raise FileNotFoundError(f"load_checkpoint: {path} has no {MANIFEST} (not a checkpoint, or an incomplete one)")
    manifest = _read_json(path / MANIFEST)
    keys = {"format", "format_version", "step", "model_config", "optimizer", "scheduler", "modules", "files"}
    if not isinstance(manifest, dict) or not keys <= manifest.keys() or manifest["format"] != FORMAT:
        raise ValueError(f"{path / MANIFEST}: not a {FORMAT} manifest (expected the keys {sorted(keys)})")
    if manifest["format_version"] != FORMAT_VERSION:
        raise ValueError(f"{path / MANIFEST}: format_version {manifest['format_version']!r}; this kdarch reads "
                         f"version {FORMAT_VERSION}")
    return manifest


def load_checkpoint(path: str | os.PathLike, *, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
                    modules: dict[str, nn.Module] = {}, restore_rng: bool = True) -> dict[str, Any]:  # noqa: B006
    """Verify the checkpoint at `path` (every file's sha256; model config, optimiser params and modules match the
    given objects), then load it into them and, with restore_rng, restore the RNG states. Nothing is changed
    when a check fails. Returns {"step": int, "state": the caller's state}."""
    path = Path(path)
    cfg = _check_model(model)
    _check_modules(modules)
    manifest = _read_manifest(path)
    files = manifest["files"]

    saved_cfg, model_cfg = manifest["model_config"], json.loads(json.dumps(cfg.to_dict()))
    diff = [f"{k}: checkpoint {saved_cfg.get(k, '<absent>')!r}, model {model_cfg.get(k, '<absent>')!r}"
            for k in sorted(saved_cfg.keys() | model_cfg.keys()) if saved_cfg.get(k) != model_cfg.get(k)]
    if diff:
        raise ValueError(f"load_checkpoint: {path} was written for a different model config; " + "; ".join(diff))
    if (optimizer is not None or modules) and sorted(modules) != manifest["modules"]:
        raise ValueError(f"load_checkpoint: {path} holds the modules {manifest['modules']}, given {sorted(modules)}")
    if optimizer is not None:
        saved, shapes = manifest["optimizer"], _param_shapes(optimizer)
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
    missing = [f for f in required + ["scheduler.json"] * (manifest["scheduler"] is not None) if f not in files]
    if missing:
        raise ValueError(f"{path / MANIFEST}: lists no {missing}; the checkpoint is incomplete")
    for name in files:
        if not (path / name).is_file():
            raise FileNotFoundError(f"load_checkpoint: {path / name} is missing")
        if _sha256(path / name) != files[name]:
            raise ValueError(f"load_checkpoint: {path / name} is corrupt (sha256 differs from the manifest)")

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
        optimizer.load_state_dict(optimizer_sd)
    if scheduler is not None:
        scheduler.load_state_dict(scheduler_sd)
    if rng is not None:
        _set_rng_state(rng)
    return {"step": manifest["step"], "state": state}
