"""The parallel layout of one training run, checked against the world size and the model before any process group
is touched, so a bad launch fails at once with a one-line error naming the field instead of hanging in a
collective.

The degrees multiply to the world size: pp × dp_replicate × dp_shard × tp. Expert parallelism takes no ranks of
its own: the ep ranks are a sub-group of the data-sharding ranks (they shard the routed experts while the rest
of the model is FSDP-sharded over the same ranks), so ep divides dp_shard.

Mesh dims (outer to inner): pp, dp_replicate, dp_shard_out (= dp_shard / ep), ep, tp. The ep ranks are the
innermost data ranks, so an all-to-all stays on the closest links.
"""
from __future__ import annotations

from dataclasses import dataclass

from kdarch.checks import ConfigError, check, check_field_types, choice_arg, fail
from kdarch.config import ModelConfig

__all__ = ["MESH_DIMS", "PP_SCHEDULES", "ParallelConfig"]

PP_SCHEDULES = ("1F1B", "Interleaved1F1B", "ZBVZeroBubble", "DualPipeV")
"""torch.distributed.pipelining's schedules; all but 1F1B put two stages on each rank."""
MESH_DIMS = ("pp", "dp_replicate", "dp_shard_out", "ep", "tp")
_STAGES_PER_RANK = {"1F1B": 1, "Interleaved1F1B": 2, "ZBVZeroBubble": 2, "DualPipeV": 2}


def _err(name: str, expected: str, got) -> None:
    fail(f"parallel.{name}", expected, got, error=ConfigError)


@dataclass(frozen=True)
class ParallelConfig:
    """[parallel]: how a run under torchrun splits over its processes (the degrees multiply to the world size)."""
    dp_replicate: int = 1
    """Data-parallel replicas (HSDP's replicated dim: whole copies of the sharded model)."""
    dp_shard: int = 1
    """Data-parallel ranks that shard parameters, gradients and optimizer state (FSDP2 fully_shard)."""
    ep: int = 1
    """Expert-parallel ranks (a divisor of dp_shard): each keeps n_routed_experts / ep routed experts and token
    copies travel to them by all-to-all."""
    pp: int = 1
    """Pipeline ranks (torch.distributed.pipelining stages; in the train loop alone, for the language-model loss)."""
    pp_schedule: str = "1F1B"
    """Pipeline schedule of torch.distributed.pipelining: 1F1B, Interleaved1F1B, ZBVZeroBubble or DualPipeV."""
    pp_microbatches: int = 1
    """Micro-batches per pipeline step (at least pp)."""
    tp: int = 1
    """Tensor-parallel ranks (kdarch plan only so far; the train loop refuses tp > 1)."""
    timeout_s: float = 300.0
    """Seconds a collective waits for the other ranks before the run fails (a rank that died or hangs)."""

    def __post_init__(self) -> None:
        check_field_types(self, "parallel")
        for name in ("dp_replicate", "dp_shard", "ep", "pp", "pp_microbatches", "tp"):
            v = getattr(self, name)
            check(v >= 1, f"parallel.{name}", "an int >= 1", v, error=ConfigError)
        check(self.timeout_s > 0, "parallel.timeout_s", "a number > 0", self.timeout_s, error=ConfigError)
        choice_arg("parallel.pp_schedule", self.pp_schedule, PP_SCHEDULES, error=ConfigError)
        check(self.dp_shard % self.ep == 0, "parallel.ep", f"a divisor of dp_shard={self.dp_shard}", self.ep,
              error=ConfigError)

    @property
    def world_size(self) -> int:
        return self.pp * self.dp_replicate * self.dp_shard * self.tp

    @property
    def mesh_shape(self) -> tuple[int, ...]:
        return (self.pp, self.dp_replicate, self.dp_shard // self.ep, self.ep, self.tp)

    def validate(self, world_size: int, model_cfg: ModelConfig) -> ParallelConfig:
        """Self, if it fits `world_size` processes and the model; else a ConfigError naming the field."""
        if self.world_size != world_size:
            _err("dp_replicate", f"pp*dp_replicate*dp_shard*tp == world size {world_size} (ep folds into "
                 f"dp_shard)", f"{self.pp}*{self.dp_replicate}*{self.dp_shard}*{self.tp} = {self.world_size}")
        if self.ep > 1:
            if not model_cfg.has_moe:
                _err("ep", "1 for a model without MoE layers", self.ep)
            if model_cfg.n_routed_experts % self.ep:
                _err("ep", f"a divisor of n_routed_experts={model_cfg.n_routed_experts}", self.ep)
        if self.pp > 1:
            stages = self.pp * _STAGES_PER_RANK[self.pp_schedule]
            if model_cfg.n_layers % stages:
                _err("pp", f"n_layers={model_cfg.n_layers} divisible into pp*{_STAGES_PER_RANK[self.pp_schedule]} "
                     f"stages ({self.pp_schedule})", self.pp)
            if self.pp_microbatches < self.pp:
                _err("pp_microbatches", f"at least pp={self.pp}", self.pp_microbatches)
        if model_cfg.n_heads % self.tp:
            _err("tp", f"a divisor of n_heads={model_cfg.n_heads}", self.tp)
        return self

    def build_mesh(self, device_type: str = "cpu"):
        """One DeviceMesh with the named dims MESH_DIMS (size-1 dims included, so code can always index them);
        the default process group must already exist (gloo on CPU, nccl on CUDA)."""
        from torch.distributed.device_mesh import init_device_mesh
        return init_device_mesh(device_type, self.mesh_shape, mesh_dim_names=MESH_DIMS)
