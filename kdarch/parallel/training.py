"""What one training stage does differently on a parallel plan, in one object the train loop calls.

The loop's step stays the 1-process step; this object supplies the differences, each chosen so that the run's
numbers do not depend on the plan:
- the model is a parallelised replica (`parallelize`) of the caller's; the caller's model stays an ordinary
  module and receives the gathered weights at every checkpoint, before each evaluation and at the end, so the
  code after training (saving, evaluating, generating) runs unchanged;
- every rank draws the same global batch and takes its own contiguous rows of it (`rows`); each loss term of a
  rank's rows (main head, each MTP depth, per-sequence terms) is divided by its count over all the data ranks
  (`global_counts`: the counts are known only after an on-policy step's sampling, so they are summed, not read off
  the global batch) and gradients are summed over the ranks, so the gradient is the 1-process gradient of the
  whole batch;
- the step's loss and metrics are summed over the data ranks (`reduce`) before anything reads them, so every
  rank takes the same decision on a non-finite step, and the router load is summed before the bias update;
- checkpoints hold whole tensors (kdarch.parallel.state), written by rank 0 and committed only after a barrier.
"""
from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn

from kdarch.checks import ConfigError
from kdarch.model.state import load_state_dict_into
from kdarch.parallel.expert_parallel import all_reduce_expert_load, ep_bytes_sent
from kdarch.parallel.parallelize import clip_grad_norm_, parallelize
from kdarch.parallel.pipeline import Pipeline
from kdarch.parallel.runtime import DistributedContext
from kdarch.parallel.state import (
    full_model_state,
    full_optimizer_state,
    load_full_model_state,
    load_full_optimizer_state,
)

__all__ = ["ParallelStage"]


class ParallelStage:
    """One training stage's parallel side: the replica `model`, its batch rows, reductions and state."""

    def __init__(self, ctx: DistributedContext, model: nn.Module, *, batch_size: int, device=None, param_dtype=None,
                 modules: dict[str, nn.Module] | None = None):
        ctx.config.validate(ctx.world_size, model.config)
        if batch_size % ctx.dp_size:
            raise ConfigError(f"train.batch_size: expected a multiple of the data-parallel ranks dp_replicate * "
                              f"dp_shard = {ctx.dp_size} (the global batch is split among them), got {batch_size}")
        if modules and ctx.config.pp > 1:
            raise ConfigError(f"parallel.pp: expected 1 with trainable objective modules ({sorted(modules)}), got "
                              f"{ctx.config.pp}")
        # objective modules (a feature-KD projector: small) stay whole on every rank, their gradients summed
        self.replicated = [p for m in (modules or {}).values() for p in m.parameters()]
        self.ctx, self.plain = ctx, model
        replica = copy.deepcopy(model).to(device)
        self.model = parallelize(replica, ctx, param_dtype=param_dtype) if ctx.config.pp == 1 else replica
        self.trained = nn.Module()  # everything the optimizer steps, by name: the model and those modules
        self.trained.add_module("model", self.model)
        for k, m in (modules or {}).items():
            self.trained.add_module(f"objective_{k}", m)
        self.pipe = Pipeline(self.model, ctx, batch_size=batch_size,
                             dtype="float32" if param_dtype is None else "bfloat16") if ctx.config.pp > 1 else None
        self.is_main = ctx.is_main

    # --- the step ---------------------------------------------------------------------------------------
    def rows(self, indices_B: torch.Tensor, ids_BT: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This data rank's contiguous share of a global batch."""
        b = ids_BT.shape[0] // self.ctx.dp_size
        r = self.ctx.dp_rank
        return indices_B[r * b:(r + 1) * b], ids_BT[r * b:(r + 1) * b]

    def global_counts(self, counts_C: torch.Tensor) -> torch.Tensor:
        """A step's loss-term counts (rows, main-head and MTP targets) summed over the data ranks: one all-reduce of
        a few integers, before any loss (pipeline ranks of one replica hold the same rows, counted once)."""
        if self.ctx.dp_size == 1:
            return counts_C
        counts_C = counts_C.clone()
        dist.all_reduce(counts_C, group=self.ctx.group("dp"))
        return counts_C

    def clip(self, params: list[nn.Parameter], max_norm: float) -> torch.Tensor:
        """Gradients completed over the ranks, then the global norm and clipping."""
        if self.pipe is not None:
            self.pipe.sum_shared_grads()
            return self.pipe.clip_grad_norm_(max_norm)
        rep = {id(p) for p in self.replicated}
        for p in self.replicated:
            if p.grad is not None:
                dist.all_reduce(p.grad, group=self.ctx.group("dp"))
        return clip_grad_norm_([p for p in params if id(p) not in rep], max_norm, self.ctx, self.replicated)

    def reduce(self, loss: torch.Tensor, sums: dict, stop: bool) -> tuple[torch.Tensor, dict, bool, float | None]:
        """(global loss, global metric sums, whether any rank was asked to stop, expert-parallel bytes all ranks
        sent this step or None): one all-reduce over all ranks (data ranks' shares; off the last pipeline stage,
        zeros)."""
        keys = sorted(sums)
        vals = [loss.detach().double().reshape(())]
        vals += [torch.as_tensor(sums[k], dtype=torch.float64, device=loss.device).reshape(()) for k in keys]
        sent = ep_bytes_sent(self.model, reset=True) if self.ctx.config.ep > 1 else None
        vals += [torch.tensor(float(stop), dtype=torch.float64, device=loss.device),
                 torch.tensor(float(sent or 0), dtype=torch.float64, device=loss.device)]
        vec = torch.stack(vals)
        dist.all_reduce(vec)
        out = {k: vec[1 + i].float() for i, k in enumerate(keys)}
        stop_any, sent_all = vec[-2:].tolist()  # one host read (the loop reads the loss once more)
        return vec[0].float(), out, stop_any > 0, (sent_all if sent is not None else None)

    def global_router_load(self) -> None:
        """Sum every MoE's measured load over the ranks (data ranks' tokens; each pipeline stage's own layers),
        before the bias update: every rank then moves every bias alike."""
        all_reduce_expert_load(self.model)

    # --- state ------------------------------------------------------------------------------------------
    def sync_plain(self) -> None:
        """Load the gathered weights into the caller's (plain) model on every rank."""
        sd = self.pipe.full_model_state() if self.pipe is not None else full_model_state(self.model)
        if self.plain.config.tie_word_embeddings:
            sd.pop("head.weight", None)
        load_state_dict_into(self.plain, {k: v.detach() for k, v in sd.items()}, "the gathered state")

    def load_from_plain(self) -> None:
        """The caller's model (just loaded from a checkpoint) into the replica."""
        if self.pipe is not None:
            self.model.load_state_dict(self.plain.state_dict())
        else:
            load_full_model_state(self.model, self.plain.state_dict())

    def optimizer_state(self, opt: torch.optim.Optimizer) -> dict:
        return self.pipe.full_optimizer_state(opt) if self.pipe is not None else full_optimizer_state(self.trained, opt)

    def optimizer_loader(self, opt: torch.optim.Optimizer) -> Callable[[dict], None]:
        if self.pipe is not None:  # whole parameters on every rank: the 1-process state as it is
            return opt.load_state_dict
        return lambda sd: load_full_optimizer_state(self.trained, opt, sd)

    def param_shapes(self, opt: torch.optim.Optimizer) -> list[list[list[int]]]:
        """The optimizer's parameter shapes as one process has them (whole experts)."""
        plain = {id(p): list(p.shape) for p in self.replicated}  # whole on every rank
        names = {id(p): n for n, p in self.model.named_parameters()}
        return [[plain[id(p)] if id(p) in plain else list(self.plain.get_parameter(names[id(p)]).shape)
                 for p in g["params"]] for g in opt.param_groups]

    def barrier(self) -> None:
        self.ctx.barrier()
