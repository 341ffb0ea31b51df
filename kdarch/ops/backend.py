"""A tiny per-op backend registry shared by every kdarch op.

Each op (e.g. "moe_ffn") may have several implementations: "torch" (the pure-PyTorch fast
path, always present), "triton" and "cpp". The model calls the functional op and never
names a backend; the choice is made here, once, in this order:
  1. the per-call `backend=` argument,
  2. the env var KDARCH_BACKEND (torch | triton | cpp | auto),
  3. "auto": the first registered, available backend in the device's preference list.
Asking for a backend the op lacks, or one that is unavailable here, is an error (never a
silent fallback), and the message lists what the op does have.
"""

from __future__ import annotations

import os
from typing import Callable

import torch

BACKENDS = ("torch", "triton", "cpp")
# "auto" preference per device type; triton is never auto-picked on the CPU (the
# interpreter is for correctness only) but can still be asked for explicitly.
_PREFERENCE = {"cuda": ("triton", "cpp", "torch"), "cpu": ("cpp", "torch")}
_REGISTRY: dict[str, dict[str, tuple[Callable, Callable[[], bool] | None]]] = {}


def register(op_name: str, backend_name: str, fn: Callable,
             available: Callable[[], bool] | None = None) -> Callable:
    """Register `fn` as the `backend_name` implementation of `op_name`; returns `fn`."""
    if backend_name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend_name!r}")
    _REGISTRY.setdefault(op_name, {})[backend_name] = (fn, available)
    return fn


def _is_available(op_name: str, name: str) -> bool:
    fn_av = _REGISTRY.get(op_name, {}).get(name)
    return fn_av is not None and (fn_av[1] is None or bool(fn_av[1]()))


def available_backends(op_name: str) -> list[str]:
    """Names of the registered backends of `op_name` that can run here."""
    return [n for n in _REGISTRY.get(op_name, {}) if _is_available(op_name, n)]


def resolve(op_name: str, backend: str | None = None,
            device: torch.device | str | None = None) -> Callable:
    """Return the implementation of `op_name` to run for `device` (see module docstring)."""
    if op_name not in _REGISTRY:
        raise ValueError(f"no backends registered for op {op_name!r}; known ops: {sorted(_REGISTRY)}")
    source = "backend="
    if backend is None:
        backend, source = os.environ.get("KDARCH_BACKEND", "auto").strip().lower() or "auto", "KDARCH_BACKEND="
    have = available_backends(op_name)
    if backend == "auto":
        dev_type = torch.device(device).type if device is not None else "cpu"
        for name in _PREFERENCE.get(dev_type, ("torch",)):
            if name in have:
                return _REGISTRY[op_name][name][0]
        raise ValueError(f"no available backend for op {op_name!r} on {dev_type}; available: {have}")
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {source}{backend!r} for op {op_name!r}: expected one of "
                         f"{BACKENDS + ('auto',)}; available for this op: {have}")
    if backend not in have:
        why = "not registered" if backend not in _REGISTRY[op_name] else "unavailable here"
        raise ValueError(f"backend {source}{backend!r} is {why} for op {op_name!r}; available: {have}")
    return _REGISTRY[op_name][backend][0]


def triton_interpreting() -> bool:
    """TRITON_INTERPRET is on: Triton kernels run on CPU tensors, in Python."""
    import os

    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def triton_usable(min_capability: tuple[int, int] | None = None) -> bool:
    """Triton importable, and either the interpreter on (TRITON_INTERPRET=1, CPU tensors) or a CUDA GPU
    (of at least `min_capability`, e.g. (8, 9) for fp8 tensor cores)."""
    import importlib.util

    import torch

    if importlib.util.find_spec("triton") is None:
        return False
    if triton_interpreting():
        return True
    return torch.cuda.is_available() and (min_capability is None
                                          or torch.cuda.get_device_capability() >= min_capability)
