"""Small testing helpers: `no_host_syncs()`, a check that code never reads a tensor's values back to the host.

On a GPU, reading a value (`.item()`, `int(t)`, `if t.any():`, `.tolist()`) or producing a tensor whose shape
depends on values (`nonzero`, boolean indexing, `unique`, `bincount`) makes the host wait for the device: the
stream drains and CUDA graphs cannot capture the step. On the CPU those calls cost nothing, so a CPU test
cannot see them by timing; it can see them by the operators they dispatch. Inside the context, each such
operator (and `Tensor.tolist` / `Tensor.numpy`, which bypass dispatch on the CPU) raises `HostSyncError`
naming it, so a training step can be proved sync-free on a machine without a GPU.

`spawn_gloo(worker, world_size, *args)`: a distributed test's processes — each joins one gloo process group on a
free local port (one torch thread each, so two ranks share two cores), runs `worker(rank, *args)` and leaves the
group, whatever the worker raised.
"""
from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["HostSyncError", "no_host_syncs", "spawn_gloo"]

SYNC_OPS = {"aten._local_scalar_dense.default", "aten.nonzero.default", "aten.nonzero_static.default",
            "aten.masked_select.default", "aten._unique2.default", "aten.unique_dim.default",
            "aten.unique_consecutive.default", "aten.bincount.default", "aten.repeat_interleave.Tensor",
            "aten.equal.default", "aten.is_nonzero.default", "aten.allclose.default"}
"""Operators that read values on the host or give a shape that depends on values."""


class HostSyncError(RuntimeError):
    """Code inside `no_host_syncs()` needed a tensor's values on the host."""


class _SyncDetector(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if name in SYNC_OPS:
            raise HostSyncError(f"{name}: a host sync (a value read back, or a value-dependent shape)")
        if name.startswith("aten.index.Tensor") and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] if len(args) > 1 else [])):
            raise HostSyncError("aten.index.Tensor with a boolean mask: a value-dependent shape (a host sync)")
        return func(*args, **(kwargs or {}))


@contextmanager
def no_host_syncs() -> Iterator[None]:
    """Raise `HostSyncError` at the first operation inside that would make the host wait for the device."""
    def refuse(name):
        def method(self, *args, **kwargs):
            raise HostSyncError(f"Tensor.{name}: a host sync (the values are read back)")
        return method
    saved = {name: getattr(torch.Tensor, name) for name in ("tolist", "numpy")}
    for name in saved:
        setattr(torch.Tensor, name, refuse(name))
    try:
        with _SyncDetector():
            yield
    finally:
        for name, method in saved.items():
            setattr(torch.Tensor, name, method)


def _gloo_rank(rank: int, worker: Callable, port: int, world_size: int, args: tuple) -> None:
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        worker(rank, *args)
    finally:
        dist.destroy_process_group()


def spawn_gloo(worker: Callable, world_size: int, *args) -> None:
    """Run the module-level function `worker(rank, *args)` in `world_size` processes of one gloo group; raises
    if any rank fails."""
    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_gloo_rank, args=(worker, port, world_size, args), nprocs=world_size, join=True)
