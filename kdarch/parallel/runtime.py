"""The process group and DeviceMesh of one run under torchrun, set up once and shared by everything above it.

`kdarch train|distill` launched by torchrun (WORLD_SIZE > 1 in the environment) calls `init_distributed` before
any work: it joins the default process group (gloo on the CPU, nccl on CUDA) with `parallel.timeout_s` on every
collective, checks the `[parallel]` layout against the world size and the model (a ConfigError naming the field,
on every rank alike), and builds the one DeviceMesh. The train loop reads it back with `current()`, so callers
between the CLI and the loop need not carry it. Tests that already joined a group (kdarch.testing.spawn_gloo)
call `init_distributed` too: it then only builds the mesh.

The mesh's data dims are regrouped here for the plan: `dp` (every data rank: batch rows, metrics, router load),
`dp_shard` (dp_shard_out x ep: the ranks FSDP shards the dense parameters over, and over which every local
gradient square sums to the global norm) and `expert` (dp_replicate x dp_shard_out: the ranks FSDP shards and
replicates the already ep-sharded experts over).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from kdarch.checks import ConfigError
from kdarch.config import ModelConfig
from kdarch.parallel.config import ParallelConfig

__all__ = ["DistributedContext", "barrier", "current", "env_world_size", "init_distributed", "is_main_process",
           "teardown"]

_CURRENT: DistributedContext | None = None


@dataclass(frozen=True)
class DistributedContext:
    """Where this process stands in the run: its plan, mesh and the groups the train loop talks over."""
    config: ParallelConfig
    mesh: object
    """The DeviceMesh with dims kdarch.parallel.config.MESH_DIMS."""
    rank: int
    world_size: int
    device_type: str
    owns_group: bool
    """True when init_distributed joined the default group (and teardown leaves it)."""
    meshes: dict
    """The regrouped submeshes by name (see `submesh`)."""

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes metrics, progress, checkpoints and reports."""
        return self.rank == 0

    @property
    def dp_size(self) -> int:
        return self.config.dp_replicate * self.config.dp_shard

    @property
    def dp_rank(self) -> int:
        """This rank's index among the data ranks: which rows of the global batch it takes."""
        _, rep, out, ep, _ = self.mesh.get_coordinate()
        c = self.config
        return (rep * (c.dp_shard // c.ep) + out) * c.ep + ep

    def submesh(self, name: str):
        """"dp" (all data ranks, 1-D), "dp_shard" (1-D), "ep" (1-D), "fsdp" (dp_replicate x dp_shard for HSDP,
        else dp_shard) or "expert" (dp_replicate x dp_shard_out, else dp_shard_out)."""
        if name not in self.meshes:
            raise ValueError(f"submesh: expected one of {sorted(self.meshes)}, got {name!r}")
        return self.meshes[name]

    def group(self, name: str):
        """The process group of a 1-D submesh ("dp", "dp_shard", "ep")."""
        return self.submesh(name).get_group()

    def barrier(self) -> None:
        """Every rank reaches here, or an error within parallel.timeout_s (on gloo naming the ranks that did
        not arrive)."""
        if dist.get_backend() == "gloo":
            dist.monitored_barrier(timeout=timedelta(seconds=self.config.timeout_s), wait_all_ranks=True)
        else:
            dist.barrier()


def env_world_size() -> int:
    """WORLD_SIZE as torchrun sets it (1 when not launched by it)."""
    raw = os.environ.get("WORLD_SIZE", "1")
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"WORLD_SIZE: expected an int (set by torchrun), got {raw!r}") from None


def init_distributed(config: ParallelConfig, model_cfg: ModelConfig | None = None,
                     device_type: str = "cpu") -> DistributedContext:
    """Join the default process group (unless one exists), check `config` against it and the model, build the
    DeviceMesh; the context becomes `current()`. Refuses layouts the train loop cannot run yet (tp > 1)."""
    global _CURRENT
    if config.tp > 1:
        raise ConfigError(f"parallel.tp: expected 1 in the train loop (tensor parallelism is estimated by kdarch "
                          f"plan only so far), got {config.tp}")
    owns = not dist.is_initialized()
    world = dist.get_world_size() if not owns else env_world_size()
    if model_cfg is not None:
        config.validate(world, model_cfg)
    elif config.world_size != world:
        config.validate(world, ModelConfig())  # the world-size check alone names the field
    if owns:
        backend = "nccl" if device_type == "cuda" else "gloo"
        if device_type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend, timeout=timedelta(seconds=config.timeout_s))
    mesh = config.build_mesh(device_type)
    meshes = {"ep": mesh["ep"], "dp": mesh["dp_replicate", "dp_shard_out", "ep"]._flatten("dp"),
              "dp_shard": mesh["dp_shard_out", "ep"]._flatten("dp_shard")}
    if config.dp_replicate > 1:  # HSDP: replicate x shard (2-D); else FSDP over dp_shard alone
        fsdp = meshes["dp"]._unflatten(0, (config.dp_replicate, config.dp_shard), ("hsdp_replicate", "hsdp_shard"))
        meshes.update(fsdp=fsdp, expert=mesh["dp_replicate", "dp_shard_out"])
    else:
        meshes.update(fsdp=meshes["dp_shard"], expert=mesh["dp_shard_out"])
    _CURRENT = DistributedContext(config, mesh, dist.get_rank(), dist.get_world_size(), device_type, owns, meshes)
    return _CURRENT


def current() -> DistributedContext | None:
    """The context `init_distributed` made in this process, or None (a 1-process run)."""
    return _CURRENT


def is_main_process() -> bool:
    """True in a 1-process run and on rank 0: the process that writes the run's files."""
    return _CURRENT is None or _CURRENT.is_main


def barrier() -> None:
    """Every rank of the run reaches here (within parallel.timeout_s); nothing in a 1-process run."""
    if _CURRENT is not None:
        _CURRENT.barrier()


def teardown() -> None:
    """Forget the context; leave the default group if init_distributed joined it."""
    global _CURRENT
    ctx, _CURRENT = _CURRENT, None
    if ctx is not None and ctx.owns_group and dist.is_initialized():
        dist.destroy_process_group()
