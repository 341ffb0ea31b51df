"""Expert parallelism: each ep rank keeps E/ep routed experts and the token copies travel to them.

Applied from outside to a built model: every `MoE` keeps its replicated gate and shared experts, its routed
weights are cut to the local slice (ordinary parameters, so any optimizer or FSDP wrapper sees them as usual),
and its `MoE.routed` step (the one the model leaves for a plan to swap) becomes one that sends each token copy,
routed locally by the replicated gate, to the rank owning its expert (variable-split all-to-all with autograd),
runs the local experts through `kdarch.ops.moe_ffn`, sends the results back and combines them in fp32 with the
routing weights, as the single-process layer does.

The aux-loss-free bias must stay identical on every rank, so it is nudged from the global load:
`all_reduce_expert_load` sums `tokens_per_expert` over the data ranks before `update_bias`.

Shape legend: N local tokens, K experts per token, M = N*K token copies, R copies received, D model width,
E routed experts, L = E/ep local experts, P ep ranks.
"""
from __future__ import annotations

import types

import torch
import torch.distributed as dist
from torch.distributed._functional_collectives import all_to_all_single_autograd

from kdarch import ops
from kdarch.checks import check
from kdarch.model.moe import MoE

__all__ = ["all_reduce_expert_load", "apply_expert_parallel", "ep_bytes_sent"]


def apply_expert_parallel(model: torch.nn.Module, ep_mesh) -> torch.nn.Module:
    """Shard every MoE's routed experts over the 1-D `ep_mesh` (in place); returns the model."""
    P, rank, group = ep_mesh.size(), ep_mesh.get_local_rank(), ep_mesh.get_group()
    for name, moe in model.named_modules():
        if not isinstance(moe, MoE):
            continue
        check(moe.n_experts % P == 0, f"apply_expert_parallel: {name}.n_experts",
              f"a multiple of the ep size {P}", moe.n_experts)
        L = moe.n_experts // P
        moe.w_gate_up = torch.nn.Parameter(moe.w_gate_up.detach()[rank * L:(rank + 1) * L].clone())
        moe.w_down = torch.nn.Parameter(moe.w_down.detach()[rank * L:(rank + 1) * L].clone())
        moe.ep_size, moe.ep_rank, moe.ep_group, moe.ep_bytes_sent = P, rank, group, 0
        moe.routed = types.MethodType(_routed_ep, moe)
    return model


def _routed_ep(moe: MoE, x_ND: torch.Tensor, topk_ids_NK: torch.Tensor, weights_NK: torch.Tensor) -> torch.Tensor:
    N, K = topk_ids_NK.shape
    P, L, group = moe.ep_size, moe.w_gate_up.shape[0], moe.ep_group
    ids_M = topk_ids_NK.flatten()
    order_M = torch.argsort(ids_M, stable=True)  # by destination rank, then local expert
    dest_M = ids_M[order_M] // L
    send_P = torch.bincount(dest_M, minlength=P)
    recv_P = torch.empty_like(send_P)
    dist.all_to_all_single(recv_P, send_P, group=group)
    send, recv = send_P.tolist(), recv_P.tolist()  # variable splits need the sizes on the host
    local_ids = torch.empty(sum(recv), dtype=ids_M.dtype, device=ids_M.device)
    dist.all_to_all_single(local_ids, (ids_M[order_M] % L).contiguous(), recv, send, group=group)
    x_MD = x_ND[order_M // K]
    x_RD = all_to_all_single_autograd(x_MD, recv, send, group)
    ones_R1 = torch.ones(len(local_ids), 1, dtype=torch.float32, device=x_ND.device)
    y_RD = ops.moe_ffn(x_RD, local_ids[:, None], ones_R1, moe.w_gate_up, moe.w_down, fp8=moe.fp8)
    y_MD = all_to_all_single_autograd(y_RD, send, recv, group)
    moe.ep_bytes_sent += (sum(send) - send[moe.ep_rank]) * x_MD[0:1].nbytes
    moe.ep_bytes_sent += (sum(recv) - recv[moe.ep_rank]) * x_MD[0:1].nbytes
    y_unsorted_MD = torch.empty_like(y_MD).index_copy(0, order_M, y_MD)
    y_NKD = y_unsorted_MD.view(N, K, -1).float()
    return (y_NKD * weights_NK.float()[..., None]).sum(dim=1).to(x_ND.dtype)


@torch.no_grad()
def all_reduce_expert_load(model: torch.nn.Module, group=None) -> None:
    """Sum every MoE's `tokens_per_expert` over `group` (the data ranks), so `update_bias` acts on the global
    load and every rank moves its biases identically."""
    for m in model.modules():
        if isinstance(m, MoE):
            dist.all_reduce(m.tokens_per_expert, group=group)


def ep_bytes_sent(model: torch.nn.Module, reset: bool = False) -> int:
    """Activation bytes this rank sent to other ranks (dispatch + combine) since the last reset."""
    total = 0
    for m in model.modules():
        if isinstance(m, MoE) and hasattr(m, "ep_bytes_sent"):
            total += m.ep_bytes_sent
            if reset:
                m.ep_bytes_sent = 0
    return total
