"""Full (unsharded) model and optimizer state of a parallelised model, and back: what checkpoints store.

A checkpoint holds the model as one process would: every tensor whole, the optimizer state keyed by parameter
index in the 1-process order (FSDP2 and expert parallelism keep the parameter names and their order). So a run
resumes on any world size, 1 process included, and the checkpoint is an ordinary kdarch model directory.

torch.distributed.checkpoint.state_dict does the FSDP part (`full_state_dict=True`: every DTensor gathered on
every rank); expert parallelism is invisible to it (to FSDP an expert weight is this rank's ep slice), so the
slices are gathered over the ep group here, and on loading each rank takes its own slice back. Gathering on
every rank keeps the code one path for any layout; it needs the whole model in each rank's host memory for the
moment of a save, as building it did.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from kdarch.model.moe import MoE

__all__ = ["full_model_state", "full_optimizer_state", "load_full_model_state", "load_full_optimizer_state"]

_FULL = StateDictOptions(full_state_dict=True)
_EXPERT_WEIGHTS = ("w_gate_up", "w_down")


def _expert_slices(model: nn.Module) -> dict[str, MoE]:
    """{parameter name: its MoE} for the routed-expert weights cut by expert parallelism."""
    return {f"{name}.{w}": m for name, m in model.named_modules()
            if isinstance(m, MoE) and getattr(m, "ep_size", 1) > 1 for w in _EXPERT_WEIGHTS}


def _gather_ep(t_L: torch.Tensor, moe: MoE) -> torch.Tensor:
    parts = [torch.empty_like(t_L) for _ in range(moe.ep_size)]
    dist.all_gather(parts, t_L.contiguous(), group=moe.ep_group)
    return torch.cat(parts)  # [E, ...]: ep rank r holds experts r*L .. (r+1)*L - 1


def _ep_slice(t_E: torch.Tensor, moe: MoE) -> torch.Tensor:
    L = t_E.shape[0] // moe.ep_size
    return t_E[moe.ep_rank * L:(moe.ep_rank + 1) * L].clone()


def _param_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The name of each optimizer parameter, in optimizer.state_dict()'s index order."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for g in optimizer.param_groups for p in g["params"]]


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict with every tensor whole, on every rank (a collective: all ranks call it)."""
    sd = get_model_state_dict(model, options=_FULL)
    for name, moe in _expert_slices(model).items():
        sd[name] = _gather_ep(sd[name], moe)
    return sd


def load_full_model_state(model: nn.Module, sd: dict[str, torch.Tensor]) -> None:
    """Load a whole-tensor state dict (every rank passes the same one) into the parallelised model."""
    sd = dict(sd)
    for name, moe in _expert_slices(model).items():
        sd[name] = _ep_slice(sd[name], moe)
    set_model_state_dict(model, sd, options=_FULL)


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """optimizer.state_dict() as one process would hold it (index keys, whole tensors), on every rank."""
    osd = get_optimizer_state_dict(model, optimizer, options=_FULL)
    names = _param_names(model, optimizer)
    index = {n: i for i, n in enumerate(names)}
    experts = _expert_slices(model)
    state = {}
    for name, st in osd["state"].items():
        if name in experts:
            st = {k: _gather_ep(v, experts[name]) if isinstance(v, torch.Tensor) and v.dim() else v
                  for k, v in st.items()}
        state[index[name]] = st
    groups = [{**g, "params": [index[n] for n in g["params"]]} for g in osd["param_groups"]]
    return {"state": dict(sorted(state.items())), "param_groups": groups}


def load_full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, osd: dict) -> None:
    """Load a 1-process optimizer.state_dict() (index keys, whole tensors) into the sharded optimizer."""
    names = _param_names(model, optimizer)
    experts = _expert_slices(model)
    state = {}
    for i, st in osd["state"].items():
        name = names[int(i)]
        if name in experts:
            st = {k: _ep_slice(v, experts[name]) if isinstance(v, torch.Tensor) and v.dim() else v
                  for k, v in st.items()}
        state[name] = st
    groups = [{**g, "params": [names[int(i)] for i in g["params"]]} for g in osd["param_groups"]]
    set_optimizer_state_dict(model, optimizer, {"state": state, "param_groups": groups}, options=_FULL)
