"""The inputs of `kdarch plan`: the machines (GPUs, nodes, memory, links, peak FLOP/s), the parallel plan, and the
model they are checked against (a preset, a kdarch / Hugging Face config.json, or a named reference model that
ships in the package, so it plans offline). Kept apart from the estimate so one cluster is searched over many
plans, and every rule a real launch would hit is checked once, with a one-line error naming the field.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from kdarch.checks import ConfigError, check, check_field_types, choice_arg
from kdarch.config import PRESETS, ModelConfig, get_preset
from kdarch.parallel.config import PP_SCHEDULES as SCHEDULES
from kdarch.parallel.config import ParallelConfig

__all__ = ["DTYPE_BYTES", "LAYOUT_FIELDS", "MODELS", "SCHEDULES", "Cluster", "Plan", "check_plan", "load_model_config"]


@dataclass(frozen=True)
class Cluster:
    """Bandwidths are per GPU and per direction (GB/s = 1e9 B/s); the peak is dense (TFLOP/s = 1e12)."""

    gpus: int = 8
    gpus_per_node: int = 8
    gpu_memory_gib: float = 80.0
    intra_node_gbps: float = 400.0
    """NVLink (or other intra-node link) bandwidth per GPU."""
    inter_node_gbps: float = 50.0
    """Inter-node (InfiniBand / RoCE) bandwidth per GPU."""
    peak_tflops: float = 989.0
    """Dense peak of the GEMM precision used (bf16 989 on H100/H200/H800, FP8 twice that)."""

    def __post_init__(self) -> None:
        check_field_types(self, "cluster")
        for name in ("gpus", "gpus_per_node"):
            check(getattr(self, name) >= 1, f"cluster.{name}", "an int >= 1", getattr(self, name), error=ConfigError)
        for name in ("gpu_memory_gib", "intra_node_gbps", "inter_node_gbps", "peak_tflops"):
            check(getattr(self, name) > 0, f"cluster.{name}", "a number > 0", getattr(self, name), error=ConfigError)
        check(self.gpus < self.gpus_per_node or self.gpus % self.gpus_per_node == 0, "cluster.gpus",
              f"whole nodes (a multiple of gpus_per_node={self.gpus_per_node}) or fewer GPUs than one node",
              self.gpus, error=ConfigError)


DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp8": 1}
MODELS = {
    # DeepSeek-V3 as pre-trained (4K sequences): the 671B main model and its one MTP module
    "deepseek-v3-671b": dict(vocab_size=129280, hidden_size=7168, n_layers=61, n_heads=128, max_seq_len=4096,
                             q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
                             v_head_dim=128, intermediate_size=18432, n_dense_layers=3, moe_intermediate_size=2048,
                             n_routed_experts=256, n_shared_experts=1, num_experts_per_tok=8, n_group=8, topk_group=4,
                             routed_scaling_factor=2.5, n_mtp_modules=1),
}
"""Reference models by name (ModelConfig fields), so they are planned offline."""


def load_model_config(spec: str) -> ModelConfig:
    """A named model (MODELS), a preset, or a kdarch / Hugging Face DeepseekV3 config.json (or its directory)."""
    if spec in MODELS:
        return ModelConfig(**MODELS[spec])
    if spec in PRESETS:
        return get_preset(spec)
    path = Path(spec) / "config.json" if Path(spec).is_dir() else Path(spec)
    if not path.is_file():
        raise FileNotFoundError(f"CONFIG: expected a model name {sorted(MODELS)}, a preset {sorted(PRESETS)} or a "
                                f"config.json path, got {spec!r}")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"CONFIG: {path}: expected JSON, got a parse error: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"CONFIG: {path}: expected a JSON object, got {type(raw).__name__}")
    from kdarch.convert.hf import HF_MODEL_TYPE, hf_config_to_kdarch
    if raw.get("model_type") == HF_MODEL_TYPE:
        return hf_config_to_kdarch(raw)
    return ModelConfig.from_dict({k: v for k, v in raw.items() if k != "model_type"})


LAYOUT_FIELDS = ("dp_replicate", "dp_shard", "ep", "pp", "pp_schedule", "pp_microbatches", "tp")
"""The fields a Plan shares with the run's ParallelConfig: one description of a layout, read by both."""


@dataclass(frozen=True)
class Plan:
    """How one training step is laid out over the cluster; validated against a model and cluster by check_plan."""
    dp_replicate: int = 1
    """Pure data-parallel replicas (HSDP's outer dimension)."""
    dp_shard: int = 1
    """Data-parallel ranks that shard state (ZeRO / FSDP2) according to zero_stage."""
    ep: int = 1
    """Expert-parallel ranks, borrowed from dp_shard * tp; each holds n_routed_experts / ep experts per layer."""
    pp: int = 1
    """Pipeline-parallel ranks."""
    pp_schedule: str = "1F1B"
    """One of SCHEDULES."""
    pp_microbatches: int | None = None
    """Micro-batches per step per pipeline (gradient accumulation when pp = 1); None: from global_batch."""
    tp: int = 1
    """Tensor-parallel ranks (within a node): attention up/out projections, dense MLPs, shared experts, vocab."""
    micro_batch_size: int = 1
    """Sequences per micro-batch per data-parallel rank."""
    seq_len: int = 4096
    """Tokens per sequence."""
    global_batch: int | None = None
    """Sequences per step; None: micro_batch_size * dp * pp_microbatches (pp_microbatches None too: 2 * pp)."""
    zero_stage: int = 3
    """What dp_shard shards: 0 nothing, 1 optimizer state (+ master weights), 2 also gradients, 3 also parameters
    (FSDP2)."""
    recompute: bool = False
    """Activation checkpointing of every block: only block inputs are kept, each block is re-run in the backward."""
    param_dtype: str = "bf16"
    """Dtype of the stored parameters."""
    grad_dtype: str = "fp32"
    """Dtype of the gradients (accumulated over micro-batches)."""
    optim_dtype: str = "fp32"
    """Dtype of AdamW's two moments."""
    master_weights: bool = True
    """Keep an fp32 master copy of the weights (only counted when param_dtype is not fp32)."""
    dispatch_dtype: str = "bf16"
    """Dtype of the expert dispatch all-to-all (fp8: 1 byte per value plus one fp32 scale per 128)."""

    def __post_init__(self) -> None:
        check_field_types(self, "parallel")
        for name in ("dp_replicate", "dp_shard", "ep", "pp", "tp", "micro_batch_size", "seq_len"):
            check(getattr(self, name) >= 1, f"parallel.{name}", "an int >= 1", getattr(self, name), error=ConfigError)
        for name in ("pp_microbatches", "global_batch"):
            v = getattr(self, name)
            check(v is None or v >= 1, f"parallel.{name}", "None or an int >= 1", v, error=ConfigError)
        choice_arg("parallel.pp_schedule", self.pp_schedule, SCHEDULES, error=ConfigError)
        choice_arg("parallel.zero_stage", self.zero_stage, (0, 1, 2, 3), error=ConfigError)
        for name in ("param_dtype", "grad_dtype", "optim_dtype"):
            choice_arg(f"parallel.{name}", getattr(self, name), ("fp32", "bf16"), error=ConfigError)
        choice_arg("parallel.dispatch_dtype", self.dispatch_dtype, ("fp32", "bf16", "fp8"), error=ConfigError)

    @property
    def dp(self) -> int:
        return self.dp_replicate * self.dp_shard

    @property
    def stages_per_rank(self) -> int:
        return 1 if self.pp_schedule == "1F1B" else 2

    @property
    def microbatches(self) -> int:
        if self.pp_microbatches is not None:
            return self.pp_microbatches
        if self.global_batch is not None:
            return self.global_batch // (self.micro_batch_size * self.dp)
        return 2 * self.pp

    @property
    def sequences(self) -> int:
        return self.micro_batch_size * self.dp * self.microbatches

    def replace(self, **changes) -> Plan:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_parallel(cls, parallel: ParallelConfig, **rest) -> Plan:
        """The plan of a run's `[parallel]` layout (its degrees, schedule and micro-batches), with the estimate's
        own fields (batch, sequence length, dtypes, ZeRO stage, recomputation) in `rest`, which win."""
        check(isinstance(parallel, ParallelConfig), "Plan.from_parallel: parallel", "a ParallelConfig",
              type(parallel).__name__, error=ConfigError)
        return cls(**{**{k: getattr(parallel, k) for k in LAYOUT_FIELDS}, **rest})

    @property
    def parallel(self) -> ParallelConfig:
        """This plan's layout as the `[parallel]` config a run under torchrun takes (a ConfigError naming the field
        where only the estimate can take it, e.g. ep ranks borrowed from tp)."""
        return ParallelConfig(**{**{k: getattr(self, k) for k in LAYOUT_FIELDS}, "pp_microbatches": self.microbatches})


def _fail(name: str, expected: str, got) -> None:
    raise ConfigError(f"parallel.{name}: expected {expected}, got {got}")


def check_plan(cfg: ModelConfig, cluster: Cluster, plan: Plan) -> None:
    """One line naming the first field of `plan` that cannot run `cfg` on `cluster`."""
    if cfg.n_heads % plan.tp or cluster.gpus_per_node % plan.tp:
        _fail("tp", f"a divisor of n_heads={cfg.n_heads} and of gpus_per_node={cluster.gpus_per_node}", plan.tp)
    n = plan.dp_replicate * plan.dp_shard * plan.pp * plan.tp
    if n != cluster.gpus:
        _fail("dp_shard", f"dp_replicate*dp_shard*pp*tp = gpus={cluster.gpus}",
              f"{plan.dp_replicate}*{plan.dp_shard}*{plan.pp}*{plan.tp} = {n}")
    if cfg.has_moe:
        if cfg.n_routed_experts % plan.ep:
            _fail("ep", f"a divisor of n_routed_experts={cfg.n_routed_experts}", plan.ep)
        if (plan.dp_shard * plan.tp) % plan.ep:
            _fail("ep", f"a divisor of dp_shard*tp={plan.dp_shard * plan.tp} (ep borrows those ranks)", plan.ep)
    elif plan.ep != 1:
        _fail("ep", "1 (the model has no MoE layer)", plan.ep)
    blocks = cfg.n_layers + cfg.n_mtp_modules
    if plan.pp * plan.stages_per_rank > blocks:
        _fail("pp", f"at most {blocks // plan.stages_per_rank} ranks: {plan.pp_schedule} cuts "
              f"{plan.stages_per_rank} stage(s) per rank from {blocks} blocks (MTP included)", plan.pp)
    if plan.pp_schedule != "1F1B" and plan.pp < 2:
        _fail("pp_schedule", "'1F1B' when pp=1", repr(plan.pp_schedule))
    if plan.global_batch is not None and plan.global_batch != plan.sequences:
        _fail("global_batch", f"micro_batch_size*dp*pp_microbatches = a multiple of {plan.micro_batch_size * plan.dp}"
              + (f" equal to {plan.sequences}" if plan.pp_microbatches is not None else ""), plan.global_batch)
    need = 2 * plan.pp if plan.pp_schedule == "DualPipeV" else plan.pp
    if plan.microbatches < need:
        _fail("pp_microbatches", f">= {need} for {plan.pp_schedule} with pp={plan.pp}", plan.microbatches)
    if plan.seq_len > cfg.max_seq_len:
        _fail("seq_len", f"<= the model's max_seq_len={cfg.max_seq_len}", plan.seq_len)
