"""The training loop shared by `kdarch train` and every stage of `kdarch distill`.

One loop for language-model training and distillation: what differs is the objective (a callable giving the
loss of a micro-batch), so teacher training, distillation, the scratch baseline and reasoning fine-tuning all
get the same optimiser, schedule, accumulation, bias update, logging, checkpointing and failure handling.

- AdamW (decay on matrices only) with linear warm-up then cosine decay to `min_lr_ratio` x lr.
- Gradient accumulation normalises by the target tokens of the whole step: micro-batch i's mean loss is
  weighted n_i / sum(n), so the update equals one big batch's whatever the padding / masking.
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
"""
from __future__ import annotations

import math
import random
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from kdarch.train.checkpoint import (
    CorruptCheckpointError,
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


def _accumulate(sums: dict, metrics: dict, weight: float) -> None:
    for k, v in metrics.items():
        sums[k] = sums.get(k, 0.0) + (v.detach().float() if isinstance(v, torch.Tensor) else v) * weight


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
    model.to(device)
    for m in objective.modules.values():
        m.to(device)
    if cfg.compile:
        compile_blocks(model)
    params = list(model.named_parameters()) + [(f"{k}.{n}", p) for k, m in objective.modules.items()
                                               for n, p in m.named_parameters()]
    opt, sched = build_optimizer(params, cfg)
    batches = Batches(train_NT, cfg.batch_size, seed=cfg.seed)
    start, state, bad_steps, tokens = 0, {}, 0, 0
    ckpt, loaded = _newest_intact(run_dir, name, model=model, optimizer=opt, scheduler=sched,
                                  modules=objective.modules) if resume else (None, None)
    if ckpt is not None:
        start, state = loaded["step"], loaded["state"]
        batches.load_state_dict(state["data"])
        objective.load_state_dict(state["objective"])
        bad_steps, tokens = state["bad_steps"], state["tokens"]
        print(f"{name}: resumed from {ckpt} (step {start})", file=sys.stderr)
    log = MetricsLog(run_dir, start if ckpt is not None else None)
    progress = Progress(name, cfg.steps, cfg.progress, start)
    amp = autocast(device, cfg.dtype, fp8=bool(getattr(getattr(model, "config", None), "fp8", False)))
    model.train()
    t0, tokens_at_t0, last, ckpt_noted = time.perf_counter(), tokens, None, False
    with stop_on_signal() as stop:
        for step in range(start + 1, cfg.steps + 1):
            micro = [next(batches) for _ in range(cfg.grad_accum)]
            counts = [objective.target_tokens(ids) for _, ids in micro]  # host batches: no device read
            total = sum(counts)
            if total == 0:
                raise TrainingError(f"{name}: step {step} has no target tokens (every label is ignored)")
            opt.zero_grad(set_to_none=True)
            sums: dict = {}
            loss_sum = torch.zeros((), device=device)
            for (idx, ids), n in zip(micro, counts):
                with amp:
                    res = objective(model, idx, to_device(ids, device), (step - 1) / cfg.steps)
                (res.loss * (n / total)).backward()
                loss_sum += res.loss.detach().float() * (n / total)
                _accumulate(sums, res.metrics, n / total)
                tokens += ids.numel()
            grad_norm = torch.nn.utils.clip_grad_norm_([p for _, p in params], cfg.grad_clip or float("inf"))
            loss_value, grad_value = torch.stack([loss_sum, grad_norm.float()]).tolist()  # the step's one read
            if not (math.isfinite(loss_value) and math.isfinite(grad_value)):
                bad_steps += 1
                opt.zero_grad(set_to_none=True)
                for moe in getattr(model, "moe_layers", lambda: [])():
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
            loads = model.update_router_biases() if hasattr(model, "update_router_biases") else {}
            sched.step()
            rate = (tokens - tokens_at_t0) / max(time.perf_counter() - t0, 1e-9)
            eval_now = evaluate is not None and cfg.eval_every and step % cfg.eval_every == 0
            if step % cfg.log_every == 0 or step == cfg.steps or step == start + 1 or eval_now:
                row = {"step": step, "loss": loss_value, **_on_host(sums), "lr": opt.param_groups[0]["lr"],
                       "grad_norm": grad_value, "tokens": tokens, "tokens_per_s": rate, "skipped_steps": bad_steps}
                imbalance = expert_imbalance(loads)
                if imbalance is not None:
                    row["expert_load_max_over_mean"] = imbalance
                if eval_now:
                    row.update(evaluate())
                    model.train()
                log.write(row)
            progress.update(loss_value, rate)
            if step == start + 5:  # long enough for this run's own load to show, early enough to matter
                warn_if_oversubscribed(torch.get_num_threads())
            if step == cfg.steps or step % cfg.checkpoint_interval == 0 or stop.signum:
                state = {"data": batches.state_dict(), "objective": objective.state_dict(), "bad_steps": bad_steps,
                         "tokens": tokens}
                # a finished stage keeps only its final checkpoint: resuming past it needs nothing older
                last = save_checkpoint(run_dir, step, model=model, optimizer=opt, scheduler=sched,
                                       modules=objective.modules, state=state,
                                       keep_last=1 if step == cfg.steps else cfg.keep_last)
                if not ckpt_noted:
                    ckpt_noted = progress.note(f"{name}: checkpoint {last.name}: "
                                               f"{sum(f.stat().st_size for f in last.iterdir()) / 2**20:.0f} MB")
            if stop.signum:  # the step is done and saved: stop here
                progress.close()
                log.close()
                raise Interrupted(stop.signum, step, last)
    progress.close()
    log.close()
    model.eval()
    if last is None:
        last = latest_checkpoint(run_dir)
    return StageResult(log.rows, cfg.steps, tokens, time.perf_counter() - t0, bad_steps, last)
