"""A tiny per-op backend registry shared by every kdarch op.

Each op (e.g. "moe_ffn") may have several implementations: "torch" (the pure-PyTorch path, always
present), "triton" and "cpp" (the compiled csrc/ ops, kdarch.ops.cpp). The model calls the functional op
and never names a backend; the choice is made here, once, in this order:
  1. the per-call `backend=` argument,
  2. the env var KDARCH_BACKEND (torch | triton | cpp | auto),
  3. "auto": the first registered, available backend in the device's preference list.
Asking for a backend the op lacks, or one that is unavailable here, is an error (never a silent
fallback), and the message lists what the op does have. Availability is asked lazily, only of the
backend about to be used (auto walks its preference list in order), so merely resolving an op never
builds the csrc/ extension of a backend that would not be picked.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

from kdarch.checks import fail

BACKENDS = ("torch", "triton", "cpp")
# "auto" preference per device type; triton is never auto-picked on the CPU (the interpreter is for
# correctness only) but can still be asked for explicitly. cpp leads on the CPU, where benchmarks/csrc_ops.py
# measures it faster than torch for every op it has (with the same results, bit for bit); without a compiler
# it is unavailable and auto falls through to torch.
_PREFERENCE = {"cuda": ("triton", "torch"), "cpu": ("cpp", "torch")}
_REGISTRY: dict[str, dict[str, tuple[Callable, Callable[[], bool] | None]]] = {}


def register(op_name: str, backend_name: str, fn: Callable,
             available: Callable[[], bool] | None = None) -> Callable:
    """Register `fn` as the `backend_name` implementation of `op_name`; returns `fn`.

    available: called at resolve time; the backend is skipped (auto) or refused (explicit) when it says False.
    """
    if backend_name not in BACKENDS:
        fail("register: backend_name", "one of " + ", ".join(map(repr, BACKENDS)), backend_name)
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
        fail("resolve: op_name", f"a registered op, one of {sorted(_REGISTRY)}", op_name)
    source = "backend"
    if backend is None:
        backend, source = os.environ.get("KDARCH_BACKEND", "auto").strip().lower() or "auto", "KDARCH_BACKEND"
    if backend == "auto":
        dev_type = torch.device(device).type if device is not None else "cpu"
        for name in _PREFERENCE.get(dev_type, ("torch",)):
            if _is_available(op_name, name):
                return _REGISTRY[op_name][name][0]
        fail(f"{op_name}: {source}", f"a backend that runs on {dev_type} (available here: "
             f"{available_backends(op_name)})", backend)
    if backend not in BACKENDS:
        fail(f"{op_name}: {source}", f"one of {', '.join(map(repr, BACKENDS + ('auto',)))} (available for this op "
             f"here: {available_backends(op_name)})", backend)
    if not _is_available(op_name, backend):
        why = "not registered for this op" if backend not in _REGISTRY[op_name] else "unavailable here"
        fail(f"{op_name}: {source}", f"an available backend, one of {available_backends(op_name)} ({backend!r} is "
             f"{why})", backend)
    return _REGISTRY[op_name][backend][0]
