"""Pipeline parallelism for the LM and distillation objectives: a CausalLM cut into stages run by
torch.distributed.pipelining.

Stage s of S = pp x (stages per rank) holds n_layers / S consecutive blocks; stage 0 also the embedding, the last
stage the final norm, the output head and the MTP modules, whose loss is the schedule's `loss_fn` (the MTP modules
need the embedding of the later tokens, so the last stage holds a reference to the embedding as well, as DeepSeek-V3
keeps MTP beside the embedding and the head). Where stages go: 1F1B one per rank; Interleaved1F1B two per rank in a
loop (s on rank s % pp); ZBVZeroBubble and DualPipeV two per rank in a V (rank r holds r and S - 1 - r), which puts
the first and the last stage on rank 0: the embedding is then used on one rank only. Otherwise the gradient of a
parameter two ranks use (the embedding; the head when tied) is summed over the pp ranks after the backward.

Each loss term of a micro-batch (the main head, each MTP depth) is divided by its count over the whole step inside
`loss_fn` (`target_counts`, summed by the caller; the schedules' own gradient scaling is off), so a step's gradient
is the 1-process gradient of the whole batch. A distillation
runs its teacher on the rank of the last stage, once per step's micro-batch, and its KD loss (main head and MTP
depths) in `loss_fn`: the target carries each row's index, which picks that row's teacher signal. Beside pp,
dp_replicate replicas each run their rows of the batch through their own pipeline and sum gradients. Each rank keeps the
whole model and its optimizer steps only the parameters that received gradients (its stages'); the router load is
summed over the ranks before the bias update, so every rank moves every bias alike. For a checkpoint every tensor
is broadcast from the rank that trains it: the state is the 1-process one.

Shape legend: b rows of a micro-batch, T positions, D model width, C counts (rows, main head, MTP depths 1..).
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.pipelining import (
    PipelineStage,
    Schedule1F1B,
    ScheduleDualPipeV,
    ScheduleInterleaved1F1B,
    ScheduleZBVZeroBubble,
)

from kdarch.checks import ConfigError
from kdarch.distill.mtp import target_counts
from kdarch.parallel.runtime import DistributedContext

__all__ = ["Pipeline"]

_SCHEDULES = {"1F1B": Schedule1F1B, "Interleaved1F1B": ScheduleInterleaved1F1B,
              "ZBVZeroBubble": ScheduleZBVZeroBubble, "DualPipeV": ScheduleDualPipeV}
_V_SHAPED = ("ZBVZeroBubble", "DualPipeV")


def stage_ranks(pp: int, schedule: str) -> list[int]:
    """The pp rank of each stage."""
    if schedule == "1F1B":
        return list(range(pp))
    if schedule in _V_SHAPED:
        return list(range(pp)) + list(range(pp))[::-1]
    return [s % pp for s in range(2 * pp)]


class _Stage(nn.Module):
    """Blocks [a, b) of the model, with the embedding in front on stage 0 and the final norm behind on the last
    stage (plus the head and MTP modules its loss uses)."""

    def __init__(self, model: nn.Module, a: int, b: int, first: bool, last: bool):
        super().__init__()
        self.first, self.last = first, last
        self.blocks = nn.ModuleList(model.layers[a:b])
        self.embed = model.embed if first or last else None
        self.norm = model.norm if last else None
        self.head = model.head if last else None
        self.mtp = model.mtp if last else None
        object.__setattr__(self, "rope", model)  # the model's rope tables, without making the model a child

    def forward(self, x):
        if self.first:
            x = self.embed(x)  # [b, T] ids -> [b, T, D]
        T = x.shape[1]
        pos = torch.arange(T, device=x.device)
        cos, sin = self.rope.rope_cos[pos], self.rope.rope_sin[pos]
        for block in self.blocks:
            x, _ = block(x, cos, sin, None)
        return self.norm(x) if self.last else x


class Pipeline:
    """This rank's stages of `model` and the schedule that runs a batch through all of them."""

    def __init__(self, model: nn.Module, ctx: DistributedContext, *, batch_size: int, dtype: str = "float32"):
        c = ctx.config
        if c.dp_shard > 1 or c.ep > 1:
            raise ConfigError(f"parallel.pp: expected dp_shard = ep = 1 beside pp > 1 in the train loop (pipeline "
                              f"stages are replicated, not FSDP- or expert-sharded, yet: use dp_replicate), got "
                              f"pp={c.pp}, dp_shard={c.dp_shard}, ep={c.ep}")
        if model.config.seq_aux_loss_coef > 0:
            raise ConfigError(f"model.seq_aux_loss_coef: expected 0 with parallel.pp > 1 (the balance loss of the "
                              f"middle stages does not reach the loss yet), got {model.config.seq_aux_loss_coef}")
        ranks = stage_ranks(c.pp, c.pp_schedule)
        S = len(ranks)
        if c.pp_schedule == "DualPipeV" and c.pp_microbatches < S:
            raise ConfigError(f"parallel.pp_microbatches: expected at least the {S} stages of DualPipeV with "
                              f"pp={c.pp}, got {c.pp_microbatches}")
        if dtype != "float32":
            raise ConfigError(f"train.dtype: expected float32 with parallel.pp > 1 (the stages exchange fp32 "
                              f"activations), got {dtype}")
        if batch_size % (c.dp_replicate * c.pp_microbatches):
            raise ConfigError(f"train.batch_size: expected a multiple of dp_replicate * pp_microbatches = "
                              f"{c.dp_replicate * c.pp_microbatches}, got {batch_size}")
        self.model, self.ctx, self.group = model, ctx, ctx.mesh["pp"].get_group()
        self.pp_rank, per = ctx.mesh["pp"].get_local_rank(), model.config.n_layers // S
        self.n_stages = S
        self.modules = {s: _Stage(model, s * per, (s + 1) * per, s == 0, s == S - 1)
                        for s in range(S) if ranks[s] == self.pp_rank}
        self.schedule = None  # built at the first batch, which gives the activations' shapes
        users: dict[int, set[int]] = {}  # parameter -> the pp ranks whose stages use it
        for s in range(S):
            for p in _Stage(model, s * per, (s + 1) * per, s == 0, s == S - 1).parameters():
                users.setdefault(id(p), set()).add(ranks[s])
        self.owner = {n: min(users.get(id(p), {0})) for n, p in model.named_parameters()}
        self.shared = [p for p in model.parameters() if len(users.get(id(p), ())) > 1]
        self._state_owner = self._module_owners(S, per, ranks)
        self.counts_C, self.head, self.last_rank = None, None, ranks[S - 1]
        self.sums: dict[str, torch.Tensor] = {}

    def _module_owners(self, S: int, per: int, ranks: list[int]) -> dict[str, int]:
        """The pp rank that trains each state-dict entry (a parameter or a buffer)."""
        owner = {}
        for name in self.model.state_dict():
            if name.startswith("layers."):
                owner[name] = ranks[int(name.split(".")[1]) // per]
            elif name.startswith("embed."):
                owner[name] = ranks[0]
            else:  # norm, head, mtp
                owner[name] = ranks[S - 1]
        return owner

    # --- a step ----------------------------------------------------------------------------------------
    def _mtp_hidden(self, h_bTD: torch.Tensor, ids_bT: torch.Tensor) -> list[torch.Tensor]:
        """The MTP modules' normed hidden states [b, T - k, D], as CausalLM.forward computes them."""
        model, T = self.model, ids_bT.shape[1]
        pos = torch.arange(T, device=h_bTD.device)
        cos, sin = model.rope_cos[pos], model.rope_sin[pos]
        h_prev, out = h_bTD, []
        for k, module in enumerate(model.mtp, start=1):
            if T - k < 1:
                break
            h_prev, h_normed, _ = module(h_prev[:, :T - k], model.embed(ids_bT[:, k:]), cos[..., :T - k, :],
                                         sin[..., :T - k, :])
            out.append(h_normed)
        return out

    def _loss(self, h_bTD: torch.Tensor, target_b3T: torch.Tensor) -> torch.Tensor:
        """The micro-batch's part of the step's loss, each term by its share of the step's count: LM + MTP (as
        CausalLM.forward composes it), or the distillation head's (`step(head=...)`) on the rows the target's third
        channel names."""
        model = self.model
        ids_bT, labels_bT, rows_b = target_b3T[:, 0], target_b3T[:, 1], target_b3T[:, 2, 0]
        if self.head is not None:
            loss, metrics = self.head(h_bTD, lambda: self._mtp_hidden(h_bTD, ids_bT), model.head.weight, labels_bT,
                                      rows_b, self.counts_C)
        else:
            s_C = target_counts(labels_bT, self.counts_C.shape[0] - 2) / self.counts_C.clamp_min(1)
            loss = model._head(h_bTD, labels_bT, 1, False)[0] * s_C[1]
            metrics = {"lm_loss": loss}
            losses = [model._head(h, labels_bT, k + 1, False)[0] * s_C[1 + k]
                      for k, h in enumerate(self._mtp_hidden(h_bTD, ids_bT) if model.mtp else [], start=1)]
            if losses:
                metrics["mtp_loss"] = torch.stack(losses).mean()
                loss = loss + model.config.mtp_loss_weight * metrics["mtp_loss"]
        for k, v in {"loss": loss, **metrics}.items():
            v = v.detach().float() if isinstance(v, torch.Tensor) else torch.tensor(float(v), device=h_bTD.device)
            self.sums[k] = self.sums.get(k, 0.0) + v
        return loss

    def _build(self, ids_BT: torch.Tensor) -> None:
        """The stages with their activation shapes given (no shape-inference pass, which would run `loss_fn` on
        uninitialised values), and the schedule."""
        c, device = self.ctx.config, ids_BT.device
        b, T = ids_BT.shape[0] // c.pp_microbatches, ids_BT.shape[1]
        x_bTD = torch.empty(b, T, self.model.config.hidden_size, device="meta", requires_grad=True)
        ids_bT = torch.empty(b, T, dtype=ids_BT.dtype, device="meta")
        stages = [PipelineStage(m, s, self.n_stages, device, group=self.group,
                                input_args=(ids_bT if s == 0 else x_bTD,), output_args=(x_bTD,))
                  for s, m in self.modules.items()]
        self.schedule = _SCHEDULES[c.pp_schedule](stages if len(stages) > 1 else stages[0],
                                                  n_microbatches=c.pp_microbatches, loss_fn=self._loss,
                                                  scale_grads=False)
        self.shape = tuple(ids_BT.shape)

    def step(self, ids_BT: torch.Tensor, labels_BT: torch.Tensor, counts_C: torch.Tensor,
             head: Callable[[], Callable] | None = None) -> tuple[torch.Tensor, dict]:
        """Forward and backward of one global micro-batch through the pipeline; returns this rank's part of the
        step's loss and metrics (zero off the last stage: the caller sums over the ranks). `counts_C`: the step's
        `target_counts` (every micro-batch, every data rank), each term's denominator. `head`, for a
        distillation: called on the rank of the last stage only (it runs the teacher on these rows), it gives that
        stage's loss function (`DistillObjective.pipeline_head`); None: the language-model loss."""
        if self.schedule is None:
            self._build(ids_BT)
        elif tuple(ids_BT.shape) != self.shape:
            raise ValueError(f"Pipeline.step: expected batches of shape {self.shape} (the pipeline's activation "
                             f"shapes are fixed at its first batch), got {tuple(ids_BT.shape)}")
        self.counts_C, self.sums = counts_C, {}
        first, last = 0 in self.modules, self.n_stages - 1 in self.modules
        self.head = head() if head is not None and last else None
        rows_BT = torch.arange(ids_BT.shape[0], device=ids_BT.device)[:, None].expand_as(ids_BT)
        target = torch.stack([ids_BT, labels_BT, rows_BT], dim=1) if last else None
        if first:
            self.schedule.step(ids_BT, target=target)
        else:
            self.schedule.step(target=target)
        zero = torch.zeros((), device=ids_BT.device)
        if head is None:
            keys = ["lm_loss"] + (["mtp_loss"] if len(self.model.mtp) and ids_BT.shape[1] > 1 else [])
        else:  # the distillation's metrics, as the last stage has them
            keys = [sorted(k for k in self.sums if k != "loss") if last else None]
            dist.broadcast_object_list(keys, group_src=self.last_rank, group=self.group)
            keys = keys[0]
        return self.sums.get("loss", zero), {k: self.sums.get(k, zero) for k in keys}

    def sum_shared_grads(self) -> None:
        """A parameter two pipeline ranks use gets the sum of both ranks' gradients; with dp_replicate > 1 every
        gradient is then summed over the replicas (each ran its own rows of the batch)."""
        for p in self.shared:
            g = p.grad if p.grad is not None else torch.zeros_like(p)
            dist.all_reduce(g, group=self.group)
            p.grad = g
        if self.ctx.config.dp_replicate > 1:
            dp = self.ctx.group("dp")
            for p in self.model.parameters():  # the same stages, so the same parameters, on every replica
                if p.grad is not None:
                    dist.all_reduce(p.grad, group=dp)

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """The global gradient norm (each parameter counted once, on its owner) and clipping as torch's."""
        sq = torch.zeros((), dtype=torch.float32, device=next(self.model.parameters()).device)
        for n, p in self.model.named_parameters():
            if p.grad is not None and self.owner[n] == self.pp_rank:
                sq += p.grad.float().pow(2).sum()
        dist.all_reduce(sq, group=self.group)
        norm = sq.sqrt()
        if max_norm != float("inf"):
            coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
            for p in self.model.parameters():
                if p.grad is not None:
                    p.grad.mul_(coef.to(p.grad.dtype))
        return norm

    # --- state -----------------------------------------------------------------------------------------
    def full_model_state(self) -> dict[str, torch.Tensor]:
        """Every tensor as its owner holds it, on every rank."""
        sd = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        for name, t in sd.items():
            dist.broadcast(t, group_src=self._state_owner[name], group=self.group)
        return sd

    def full_optimizer_state(self, opt: torch.optim.Optimizer) -> dict:
        """optimizer.state_dict() of one process: each parameter's state from its owner."""
        osd = opt.state_dict()
        names = {id(p): n for n, p in self.model.named_parameters()}
        params = [p for g in opt.param_groups for p in g["params"]]
        state = {}
        for i, p in enumerate(params):
            src = self.owner[names[id(p)]]
            mine = osd["state"].get(i, {})
            like = {"step": torch.zeros((), dtype=torch.float32), "exp_avg": torch.zeros_like(p),
                    "exp_avg_sq": torch.zeros_like(p)}
            st = {}
            for k, ref in like.items():
                t = mine[k].detach().clone() if k in mine and src == self.pp_rank else ref
                dist.broadcast(t, group_src=src, group=self.group)
                st[k] = t
            state[i] = st
        return {"state": state, "param_groups": osd["param_groups"]}
