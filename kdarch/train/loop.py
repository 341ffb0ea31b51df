"""The training loop shared by `kdarch train` and every stage of `kdarch distill`.

One loop for language-model training and distillation: what differs is the objective (a callable giving the
loss of a micro-batch), so teacher training, distillation, the scratch baseline and reasoning fine-tuning all
get the same optimiser, schedule, accumulation, bias update, logging, checkpointing and failure handling.

- AdamW (decay on matrices only) with linear warm-up then cosine decay to `min_lr_ratio` x lr.
- Gradient accumulation normalises every loss term by its own count over the whole step (the objective's
  `prepare` counts each micro-batch's rows and main-head and MTP targets, after sampling on an on-policy step;
  the loop sums them, over the data ranks too, before the first loss), so the update equals one big batch's
  whatever the padding / masking.
- After each optimizer step the MoE router biases are nudged (aux-loss-free balancing) and the measured
  expert load is logged (max load / mean load, 1.0 = perfectly balanced).
- A non-finite loss or gradient norm (a NaN teacher signal makes both) skips the step (no update, warning,
  counter); more than `max_bad_steps` of them stop the run with an error.
- Devices (`train.device`, `kdarch.train.device`): model, objective modules and optimizer state on the device,
  batches copied from pinned memory without blocking, bf16 autocast on the device's type. The step reads
  nothing back from the device; the loop reads the loss and gradient norm once per step, and the logged
  metrics at logging steps.
- Checkpoints (weights, optimiser, scheduler, data position, objective and RNG state) every
  `checkpoint_every` steps, at the end (only that one is kept once the stage is done) and on Ctrl-C / SIGTERM
  (`kdarch.train.interrupt`); `resume=True` continues from the newest intact one (a corrupt newer one is
  skipped with a warning) and reproduces the uninterrupted run's losses exactly on the CPU (the metrics file is
  cut back to the checkpoint's step).
- Under torchrun (`kdarch.parallel.runtime.init_distributed` made a context) the stage trains a parallelised
  replica through `kdarch.parallel.training.ParallelStage`: each data rank takes its rows of the same global
  batch (`train.batch_size` is global), every term is divided by its global count and losses and metrics are
  summed over the ranks, so the losses are the 1-process run's; rank 0 alone writes metrics, progress and
  checkpoints (whole tensors, resumable on any world size). Under `parallel.pp` each micro-batch goes through the
  pipeline schedule (`kdarch.parallel.pipeline`), which runs forward and backward itself (a distillation's teacher
  and loss on the rank of the last stage). A distillation teacher runs on each data rank's own rows: whole on every
  rank, or FSDP2-sharded over the data ranks with `distill.teacher_shard` (`kdarch.parallel.teacher`).
"""
from __future__ import annotations

import math
import random
import signal
import sys
import time
import warnings
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from kdarch.checks import ConfigError
from kdarch.parallel import runtime
from kdarch.parallel.teacher import shard_teacher
from kdarch.parallel.training import ParallelStage
from kdarch.train.checkpoint import (
    CorruptCheckpointError,
    checkpoint_path,
    complete_checkpoints,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from kdarch.train.config import TrainSection
from kdarch.train.data import Batches
from kdarch.train.device import autocast, resolve_device, to_device
from kdarch.train.interrupt import Interrupted, stop_on_signal
from kdarch.train.metrics import MetricsLog, Progress, expert_imbalance, warn_if_oversubscribed
from kdarch.train.objective import LMObjective, Objective


class TrainingError(RuntimeError):
    """Training cannot go on (too many non-finite steps, unusable data)."""


def set_seed(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def build_optimizer(params: list[tuple[str, nn.Parameter]], cfg: TrainSection):
    """AdamW with weight decay on matrices except embeddings, and warm-up + cosine LambdaLR."""
    seen, decay, no_decay = set(), [], []
    for name, p in params:
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 and "embed" not in name else no_decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), foreach=False)

    def lr_factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        p = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * p))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)


@dataclass
class StageResult:
    rows: list[dict]
    """The logged metrics rows."""
    steps: int
    tokens: int
    """Training tokens consumed (inputs, all micro-batches)."""
    seconds: float
    """Wall time of this process's part of the run (excludes a killed run's part before resumption)."""
    bad_steps: int
    checkpoint: Path | None


class _RowsOnly:
    """A rank other than 0 keeps the logged rows (the caller reads them) and writes no file."""

    def __init__(self):
        self.rows: list[dict] = []

    def write(self, row: dict) -> None:
        self.rows.append(row)

    def close(self) -> None:
        pass


_BROKEN = ("gloo", "nccl", "connection", "monitoredbarrier", "timed out", "timeout", "closed", "peer")


@contextmanager
def _collective_failures(par: ParallelStage | None, name: str, step: Callable[[], int]):
    """Under torchrun, a collective that broke (another rank died or hung past parallel.timeout_s) becomes a
    TrainingError naming this rank and the step; torchrun then names the rank that died first."""
    try:
        yield
    except (RuntimeError, torch.distributed.DistError) as e:
        text = str(e).strip()
        if par is None or isinstance(e, TrainingError) or not any(w in text.lower() for w in _BROKEN):
            raise
        first = text.splitlines()[0] if text else type(e).__name__
        raise TrainingError(f"{name}: rank {par.ctx.rank} of {par.ctx.world_size} stopped at step {step()}: a "
                            f"collective with the other ranks failed ({first})") from e


def _newest_intact(run_dir: Path, name: str, **objects):
    """(path, loaded state) of the newest checkpoint that loads; a corrupt newer one is skipped with a warning
    naming both (the next save sweeps it away). (None, None) when there is none."""
    found = [d for _, d in complete_checkpoints(run_dir)][::-1]
    for i, d in enumerate(found):
        try:
            return d, load_checkpoint(d, **objects)
        except CorruptCheckpointError as e:
            older = f"resuming from {found[i + 1].name} instead" if i + 1 < len(found) else "no older one is left"
            warnings.warn(f"{name}: checkpoint {d} is unusable ({e}); {older}", stacklevel=3)
    if found:
        raise TrainingError(f"{name}: none of the checkpoints in {run_dir / 'checkpoints'} loads; see the warnings "
                            f"above")
    return None, None


def compile_blocks(model: nn.Module) -> None:
    """Regional compilation: `torch.compile` each transformer block (main and MTP) in place. Blocks of the same
    kind compile to one graph (parameters are graph inputs), so compiling costs a few graphs, not one per layer;
    the custom ops' fakes let either MoE backend trace."""
    blocks = list(getattr(model, "layers", [])) + [m.block for m in getattr(model, "mtp", [])]
    for block in blocks:
        block.compile(dynamic=False)


def _accumulate(sums: dict, metrics: dict) -> None:
    """Metrics are each micro-batch's part of the step's value: their sum is the step's."""
    for k, v in metrics.items():
        sums[k] = sums.get(k, 0.0) + (v.detach().float() if isinstance(v, torch.Tensor) else v)


def _on_host(values: dict) -> dict[str, float]:
    """The logged values as floats: one device read for all of them."""
    keys = [k for k, v in values.items() if isinstance(v, torch.Tensor)]
    read = torch.stack([values[k].reshape(()).float() for k in keys]).tolist() if keys else []
    return {**values, **dict(zip(keys, read))}


def train(model: nn.Module, cfg: TrainSection, train_NT: torch.Tensor, run_dir: str | Path, *,
          objective: Objective | None = None, resume: bool = False, name: str = "train",
          evaluate: Callable[[], dict] | None = None) -> StageResult:
    """Train `model` on the packed sequences `train_NT` for `cfg.steps` optimizer steps on `cfg.device`, writing
    metrics and checkpoints under `run_dir`. `evaluate()` (optional) is called every `cfg.eval_every` steps and
    its values are logged with the step. The step itself (forward, loss, backward) reads nothing back from the
    device; the loop does once per step, to skip a non-finite one, and at logging steps."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    objective = objective or LMObjective()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.use_deterministic_algorithms(cfg.deterministic)
    set_seed(cfg.seed)
    device = resolve_device(cfg.device)
    ctx = runtime.current()
    if ctx is not None and device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())  # LOCAL_RANK's, set by init_distributed
    if ctx is None:
        model.to(device)
    for m in objective.modules.values():
        m.to(device)
    # under a plan the caller's model stays where it is while its replica trains on the device
    par = ParallelStage(ctx, model, batch_size=cfg.batch_size, modules=objective.modules, device=device,
                        param_dtype=torch.bfloat16 if cfg.dtype == "bfloat16" else None) if ctx is not None else None
    net = par.model if par is not None else model  # what trains: the model, or its parallelised replica
    main = par is None or par.is_main
    pipe = par.pipe if par is not None else None
    kd_stage = pipe is not None and type(objective) is not LMObjective  # the teacher and KD loss on the last stage
    if kd_stage and not hasattr(objective, "pipeline_head"):
        raise ConfigError(f"parallel.pp: expected 1 for a {type(objective).__name__} (pipeline stages run the "
                          f"language-model or the distillation loss only), got {ctx.config.pp}")
    if kd_stage:
        objective.check_pipeline(ctx.config.pp)
    if par is not None and getattr(getattr(objective, "cfg", None), "teacher_shard", False):
        shard_teacher(objective.teacher, ctx)  # else a model teacher stays whole on every data rank
    if cfg.compile:
        compile_blocks(net)
    params = list(net.named_parameters()) + [(f"{k}.{n}", p) for k, m in objective.modules.items()
                                             for n, p in m.named_parameters()]
    opt, sched = build_optimizer(params, cfg)
    batches = Batches(train_NT, cfg.batch_size, seed=cfg.seed)
    start, state, bad_steps, tokens = 0, {}, 0, 0
    sharded = {} if par is None else {"param_shapes": par.param_shapes(opt),
                                      "load_optimizer": par.optimizer_loader(opt)}
    ckpt, loaded = _newest_intact(run_dir, name, model=model, optimizer=opt, scheduler=sched,
                                  modules=objective.modules, **sharded) if resume else (None, None)
    if ckpt is not None and par is not None:
        par.load_from_plain()
    if ckpt is not None:
        start, state = loaded["step"], loaded["state"]
        batches.load_state_dict(state["data"])
        objective.load_state_dict(state["objective"])
        bad_steps, tokens = state["bad_steps"], state["tokens"]
        if main:
            print(f"{name}: resumed from {ckpt} (step {start})", file=sys.stderr)
    log = MetricsLog(run_dir, start if ckpt is not None else None) if main else _RowsOnly()
    progress = Progress(name, cfg.steps, cfg.progress and main, start)
    amp = autocast(device, cfg.dtype, fp8=bool(getattr(getattr(model, "config", None), "fp8", False)))
    net.train()
    t0, tokens_at_t0, last, ckpt_noted = time.perf_counter(), tokens, None, False
    step = start
    with stop_on_signal() as stop, _collective_failures(par, name, lambda: step):
        for step in range(start + 1, cfg.steps + 1):
            micro = [next(batches) for _ in range(cfg.grad_accum)]  # the global batch (every rank draws it)
            total = sum(objective.target_tokens(ids) for _, ids in micro)  # host batches: no device read
            if total == 0:
                raise TrainingError(f"{name}: step {step} has no target tokens (every label is ignored)")
            tokens += sum(ids.numel() for _, ids in micro)
            if par is not None:
                micro = [par.rows(idx, ids) for idx, ids in micro]
            opt.zero_grad(set_to_none=True)
            sums: dict = {}
            loss_sum = torch.zeros((), device=device)
            at = (step - 1) / cfg.steps
            with amp:  # labels and counts of every micro-batch (on-policy: its samples) before the first loss
                prepared = [objective.prepare(net, idx, to_device(ids, device), at) for idx, ids in micro]
            counts_C = torch.stack([b.counts_C for b in prepared]).sum(0)
            if par is not None:
                counts_C = par.global_counts(counts_C)
            for b in prepared:
                b.step_counts_C = counts_C
                if pipe is not None:  # forward and backward through the stages, each micro-batch's shares inside
                    head = (lambda i=b.indices_B, x=b.ids_BT, t=at: objective.pipeline_head(i, x, t)) \
                        if kd_stage else None
                    part, metrics = pipe.step(b.ids_BT, b.labels_BT, counts_C, head=head)
                    loss_sum += part
                    _accumulate(sums, metrics)
                    continue
                with amp:
                    res = objective(net, b.indices_B, b, at)
                res.loss.backward()
                loss_sum += res.loss.detach().float()
                _accumulate(sums, res.metrics)
            sent = None
            if par is not None:
                grad_norm = par.clip([p for _, p in params], cfg.grad_clip or float("inf"))
                # every rank stops at the same step: the one where any of them had been asked to
                loss_sum, sums, voted_stop, sent = par.reduce(loss_sum, sums, bool(stop.signum))
            else:
                grad_norm = torch.nn.utils.clip_grad_norm_([p for _, p in params], cfg.grad_clip or float("inf"))
            loss_value, grad_value = torch.stack([loss_sum, grad_norm.float()]).tolist()  # the step's one read
            if not (math.isfinite(loss_value) and math.isfinite(grad_value)):
                bad_steps += 1
                opt.zero_grad(set_to_none=True)
                for moe in getattr(net, "moe_layers", lambda: [])():
                    moe.tokens_per_expert.zero_()
                warnings.warn(f"{name}: step {step} skipped (non-finite loss {loss_value} or gradient norm "
                              f"{grad_value}); {bad_steps} skipped so far", stacklevel=2)
                if bad_steps > cfg.max_bad_steps:
                    raise TrainingError(f"{name}: {bad_steps} steps skipped for non-finite values (train.max_bad_steps="
                                        f"{cfg.max_bad_steps}); lower train.lr or check the data / teacher")
                sched.step()
                progress.update(float("nan"), 0.0)
                continue
            opt.step()
            if par is not None:
                par.global_router_load()
            loads = net.update_router_biases() if hasattr(net, "update_router_biases") else {}
            sched.step()
            rate = (tokens - tokens_at_t0) / max(time.perf_counter() - t0, 1e-9)
            eval_now = evaluate is not None and cfg.eval_every and step % cfg.eval_every == 0
            if step % cfg.log_every == 0 or step == cfg.steps or step == start + 1 or eval_now:
                row = {"step": step, "loss": loss_value, **_on_host(sums), "lr": opt.param_groups[0]["lr"],
                       "grad_norm": grad_value, "tokens": tokens, "tokens_per_s": rate, "skipped_steps": bad_steps}
                imbalance = expert_imbalance(loads)
                if imbalance is not None:
                    row["expert_load_max_over_mean"] = imbalance
                if sent is not None:
                    row["ep_bytes_sent"] = sent
                if eval_now:
                    if par is not None:
                        par.sync_plain()  # evaluate() sees the caller's model
                    row.update(evaluate())
                    net.train()
                log.write(row)
            progress.update(loss_value, rate)
            if step == start + 5:  # long enough for this run's own load to show, early enough to matter
                warn_if_oversubscribed(torch.get_num_threads())
            halt = bool(stop.signum) if par is None else voted_stop
            if step == cfg.steps or step % cfg.checkpoint_interval == 0 or halt:
                state = {"data": batches.state_dict(), "objective": objective.state_dict(), "bad_steps": bad_steps,
                         "tokens": tokens}
                sharded = {}
                if par is not None:  # whole tensors gathered on every rank, the caller's model updated
                    par.sync_plain()
                    sharded = {"optimizer_state": par.optimizer_state(opt), "param_shapes": par.param_shapes(opt),
                               "before_commit": par.barrier}
                # a finished stage keeps only its final checkpoint: resuming past it needs nothing older
                if main:
                    last = save_checkpoint(run_dir, step, model=model, optimizer=opt, scheduler=sched,
                                           modules=objective.modules, state=state,
                                           keep_last=1 if step == cfg.steps else cfg.keep_last, **sharded)
                else:
                    par.barrier()  # rank 0 commits the checkpoint once every rank is here
                    last = checkpoint_path(run_dir, step)
                if main and not ckpt_noted:
                    ckpt_noted = progress.note(f"{name}: checkpoint {last.name}: "
                                               f"{sum(f.stat().st_size for f in last.iterdir()) / 2**20:.0f} MB")
            if halt:  # the step is done and saved: stop here
                progress.close()
                log.close()
                raise Interrupted(stop.signum or signal.SIGTERM, step, last)
    progress.close()
    log.close()
    if par is not None:
        model.to(device)  # holding the gathered weights of the last step, where a 1-process run leaves it
    model.eval()
    if last is None:
        last = latest_checkpoint(run_dir)
    return StageResult(log.rows, cfg.steps, tokens, time.perf_counter() - t0, bad_steps, last)
