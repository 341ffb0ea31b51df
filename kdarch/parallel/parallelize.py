"""A built CausalLM made data- and expert-parallel from outside, torchtitan-style: EP first, then FSDP2.

Order and units:
- `apply_expert_parallel` cuts each MoE's routed experts to this rank's ep slice (ep > 1);
- FSDP2 `fully_shard` per transformer block (main and MTP) and the root, over the data ranks: plain FSDP over
  dp_shard, or HSDP over (dp_replicate, dp_shard). Under ep > 1 the experts are no longer the same tensor on
  every data rank, so they must not be sharded over the ep ranks again: each MoE's gate and shared expert become
  their own units over all data ranks, and the MoE itself (left holding only the routed experts) one over
  (dp_replicate, dp_shard_out), the ranks that hold the same experts (torchtitan shards its GroupedExperts over
  its "dp_shard_mod_ep" mesh the same way).
- bf16 (`train.dtype`): a MixedPrecisionPolicy with bf16 parameters for compute and fp32 gradient reduction.

Gradients are summed, not averaged, over the data ranks (gradient divide factor 1): each rank weights its rows'
loss by its share of the GLOBAL target tokens, so the summed gradient is the 1-process gradient of the whole
batch. An expert's gradient already arrives summed over the ep ranks through the all-to-all's backward, so the
same sum holds for it.

The global gradient norm (`clip_grad_norm_`): every parameter's local shard squares, summed over dp_shard (the
dense parameters are sharded over it; the experts over dp_shard_out x ep, the same ranks), never over the
replicas.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from kdarch.model.moe import MoE
from kdarch.parallel.expert_parallel import apply_expert_parallel
from kdarch.parallel.runtime import DistributedContext

__all__ = ["clip_grad_norm_", "parallelize"]


def parallelize(model: nn.Module, ctx: DistributedContext, *, param_dtype: torch.dtype | None = None) -> nn.Module:
    """Apply the context's plan to `model` in place (EP, then FSDP2 units); returns it."""
    c = ctx.config
    if c.ep > 1:
        apply_expert_parallel(model, ctx.submesh("ep"))
    if ctx.dp_size == 1:
        return model
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32) if param_dtype is not None \
        else MixedPrecisionPolicy()
    dense_mesh, expert_mesh = ctx.submesh("fsdp"), ctx.submesh("expert")
    blocks = list(getattr(model, "layers", [])) + list(getattr(model, "mtp", []))
    for block in blocks:
        if c.ep > 1:
            for moe in (m for m in block.modules() if isinstance(m, MoE)):
                for sub in (moe.gate, moe.shared):
                    if sub is not None:
                        fully_shard(sub, mesh=dense_mesh, mp_policy=mp)
                fully_shard(moe, mesh=expert_mesh, mp_policy=mp)
        fully_shard(block, mesh=dense_mesh, mp_policy=mp)
    fully_shard(model, mesh=dense_mesh, mp_policy=mp)
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.set_gradient_divide_factor(1.0)
            m.set_force_sum_reduction_for_comms(True)  # a plain SUM (gloo has no PREMUL_SUM)
    return model


@torch.no_grad()
def clip_grad_norm_(params: list[nn.Parameter], max_norm: float, ctx: DistributedContext,
                    replicated: list[nn.Parameter] = ()) -> torch.Tensor:
    """The global gradient norm of the sharded `params` plus the `replicated` ones (whole on every rank, their
    gradients already summed: counted once), the 1-process norm; every gradient scaled by
    min(1, max_norm / (norm + 1e-6)) as torch.nn.utils.clip_grad_norm_ does."""
    local = [p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad for p in params if p.grad is not None]
    whole = [p.grad for p in replicated if p.grad is not None]
    device = (local + whole)[0].device if local + whole else torch.device(ctx.device_type)
    sq = torch.zeros((), dtype=torch.float32, device=device)
    for g in local:
        sq += g.float().pow(2).sum()
    if ctx.config.dp_shard > 1:
        dist.all_reduce(sq, group=ctx.group("dp_shard"))
    for g in whole:
        sq += g.float().pow(2).sum()
    norm = sq.sqrt()
    if max_norm != float("inf"):
        coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        for g in local + whole:
            g.mul_(coef.to(g.dtype))
    return norm
