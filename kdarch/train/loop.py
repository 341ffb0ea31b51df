"""The training loop shared by `kdarch train` and every stage of `kdarch distill`.

One loop for language-model training and distillation: what differs is the objective (a callable giving the
loss of a micro-batch), so teacher training, distillation, the scratch baseline and reasoning fine-tuning all
get the same optimiser, schedule, accumulation, bias update, logging, checkpointing and failure handling.

- AdamW (decay on matrices only) with linear warm-up then cosine decay to `min_lr_ratio` x lr.
- Gradient accumulation normalises by the target tokens of the whole step: micro-batch i's mean loss is
  weighted n_i / sum(n), so the update equals one big batch's whatever the padding / masking.
- After each optimizer step the MoE router biases are nudged (aux-loss-free balancing) and the measured
  expert load is logged (max load / mean load, 1.0 = perfectly balanced).
- A non-finite loss, gradient norm or teacher signal skips the step (no update, warning, counter); more
  than `max_bad_steps` of them stop the run with an error.
- Checkpoints (weights, optimiser, scheduler, data position, objective and RNG state) every
  `checkpoint_every` steps, at the end (only that one is kept once the stage is done) and on Ctrl-C / SIGTERM
  (`kdarch.train.interrupt`); `resume=True` continues from the newest intact one (a corrupt newer one is
  skipped with a warning) and reproduces the uninterrupted run's losses exactly on the CPU (the metrics file is
  cut back to the checkpoint's step).
"""
from __future__ import annotations

import csv
import json
import math
import os
import random
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
from torch import nn
from tqdm import tqdm

from kdarch.train.checkpoint import (
    CorruptCheckpointError,
    complete_checkpoints,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from kdarch.train.config import TrainSection
from kdarch.train.data import Batches
from kdarch.train.interrupt import Interrupted, stop_on_signal


class TrainingError(RuntimeError):
    """Training cannot go on (too many non-finite steps, unusable data)."""


class NonFiniteError(ValueError):
    """Raised by an objective when its inputs (e.g. teacher logits) are NaN/inf: the step is skipped."""


@dataclass
class StepLoss:
    loss: torch.Tensor
    """Scalar to minimise: the mean over this micro-batch's target tokens."""
    metrics: dict[str, float] = field(default_factory=dict)
    """Values to log (their token-weighted mean over micro-batches is reported)."""


class Objective(Protocol):
    modules: dict[str, nn.Module]
    """Extra trainable modules (e.g. feature-KD projectors): optimised and checkpointed with the model."""

    def __call__(self, model: nn.Module, indices_B: torch.Tensor, ids_BT: torch.Tensor,
                 progress: float) -> StepLoss: ...

    def target_tokens(self, ids_BT: torch.Tensor) -> int: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


def labels_for(ids_BT: torch.Tensor, pad_id: int | None) -> torch.Tensor:
    """The labels of a batch (HF convention: the ids, shifted inside the model), padding ignored (-100)."""
    return ids_BT if pad_id is None else ids_BT.masked_fill(ids_BT == pad_id, -100)


def count_targets(ids_BT: torch.Tensor, pad_id: int | None) -> int:
    """Next-token targets of a batch: every position but the first, minus padding."""
    return int((labels_for(ids_BT, pad_id)[:, 1:] != -100).sum())


class LMObjective:
    """Next-token cross-entropy + the model's MTP and balance losses (training a teacher or a scratch student).
    pad_id: a token id that only pads rows (one document per row) and is never a target."""
    modules: dict[str, nn.Module] = {}

    def __init__(self, pad_id: int | None = None):
        self.pad_id = pad_id

    def __call__(self, model, indices_B, ids_BT, progress):
        out = model(ids_BT, labels=labels_for(ids_BT, self.pad_id), return_logits=False)
        metrics = {"lm_loss": out.lm_loss.item()}
        if out.mtp_loss is not None:
            metrics["mtp_loss"] = out.mtp_loss.item()
        return StepLoss(out.loss, metrics)

    def target_tokens(self, ids_BT):
        return count_targets(ids_BT, self.pad_id)

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


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


class MetricsLog:
    """metrics.jsonl (appended live), metrics.csv (rewritten at the end) and TensorBoard when installed."""

    def __init__(self, run_dir: Path, resume_step: int | None):
        self.path = run_dir / "metrics.jsonl"
        self.rows = []
        if resume_step is not None and self.path.exists():
            rows = [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
            self.rows = [r for r in rows if r["step"] <= resume_step]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in self.rows))
        self.tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(run_dir / "tensorboard"))
        except Exception:  # tensorboard not installed: JSONL/CSV only
            pass

    def write(self, row: dict) -> None:
        self.rows.append(row)
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, row["step"])

    def close(self) -> None:
        keys = list(dict.fromkeys(k for r in self.rows for k in r))
        with (self.path.with_suffix(".csv")).open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(self.rows)
        if self.tb is not None:
            self.tb.close()


class Progress:
    """The stage's progress bar on stderr (tqdm): step, loss and tokens/s. On a terminal it redraws in place;
    in a log file (not a TTY) it writes a line at most every `log_interval` seconds."""

    def __init__(self, name: str, total: int, enabled: bool, start: int = 0, log_interval: float = 10.0):
        tty = sys.stderr.isatty()
        self.bar = tqdm(total=total, initial=start, desc=name, unit="step", file=sys.stderr, disable=not enabled,
                        dynamic_ncols=tty, mininterval=0.1 if tty else log_interval, ascii=not tty)

    def update(self, loss: float, tokens_per_s: float) -> None:
        self.bar.set_postfix_str(f"loss {loss:.3f}, {tokens_per_s:,.0f} tok/s", refresh=False)
        self.bar.update(1)

    def note(self, text: str) -> bool:
        """A line of text above the bar (or on stderr when the bar is off); returns True."""
        self.bar.write(text, file=sys.stderr)
        return True

    def close(self) -> None:
        self.bar.close()


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


def expert_imbalance(loads: dict[str, torch.Tensor]) -> float | None:
    """Max over MoE layers of (max expert load / mean expert load): 1.0 when perfectly balanced."""
    vals = [float(lo.max() * lo.numel()) for lo in loads.values() if lo.sum() > 0]
    return max(vals) if vals else None


_LOAD_WARNED = False


def warn_if_oversubscribed(threads: int) -> None:
    """Warn once per process when other work shares the cores (1-minute load average well above them): runs
    then slow down many times over, with nothing else to say why."""
    global _LOAD_WARNED
    cpus = os.cpu_count() or 1
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if not _LOAD_WARNED and load > 1.5 * cpus + 0.5:
        _LOAD_WARNED = True
        warnings.warn(f"the machine is oversubscribed: load average {load:.1f} on {cpus} cores, training with "
                      f"{threads} threads; other jobs share the cores and this run will be several times slower "
                      f"(run one job at a time, or give each fewer threads with --train.threads)", stacklevel=3)


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


def train(model: nn.Module, cfg: TrainSection, train_NT: torch.Tensor, run_dir: str | Path, *,
          objective: Objective | None = None, resume: bool = False, name: str = "train",
          evaluate: Callable[[], dict] | None = None) -> StageResult:
    """Train `model` on the packed sequences `train_NT` for `cfg.steps` optimizer steps, writing metrics and
    checkpoints under `run_dir`. `evaluate()` (optional) is called every `cfg.eval_every` steps and its
    values are logged with the step."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    objective = objective or LMObjective()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.use_deterministic_algorithms(cfg.deterministic)
    set_seed(cfg.seed)
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
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.dtype == "bfloat16")
    model.train()
    t0, tokens_at_t0, last, ckpt_noted = time.perf_counter(), tokens, None, False
    with stop_on_signal() as stop:
        for step in range(start + 1, cfg.steps + 1):
            micro = [next(batches) for _ in range(cfg.grad_accum)]
            counts = [objective.target_tokens(ids) for _, ids in micro]
            total = sum(counts)
            if total == 0:
                raise TrainingError(f"{name}: step {step} has no target tokens (every label is ignored)")
            opt.zero_grad(set_to_none=True)
            sums: dict[str, float] = {}
            loss_value, ok = 0.0, True
            for (idx, ids), n in zip(micro, counts):
                try:
                    with autocast:
                        res = objective(model, idx, ids, (step - 1) / cfg.steps)
                except NonFiniteError as e:
                    ok, reason = False, str(e)
                    break
                if not torch.isfinite(res.loss):
                    ok, reason = False, f"non-finite loss {res.loss.item()}"
                    break
                (res.loss * (n / total)).backward()
                loss_value += res.loss.item() * n / total
                for k, v in res.metrics.items():
                    sums[k] = sums.get(k, 0.0) + v * n / total
                tokens += ids.numel()
            if ok:
                grad_norm = torch.nn.utils.clip_grad_norm_([p for _, p in params], cfg.grad_clip or float("inf"))
                if not torch.isfinite(grad_norm):
                    ok, reason = False, f"non-finite gradient norm {grad_norm.item()}"
            if not ok:
                bad_steps += 1
                opt.zero_grad(set_to_none=True)
                for moe in getattr(model, "moe_layers", lambda: [])():
                    moe.tokens_per_expert.zero_()
                warnings.warn(f"{name}: step {step} skipped ({reason}); {bad_steps} skipped so far", stacklevel=2)
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
                row = {"step": step, "loss": loss_value, **sums, "lr": opt.param_groups[0]["lr"],
                       "grad_norm": float(grad_norm), "tokens": tokens, "tokens_per_s": rate,
                       "skipped_steps": bad_steps}
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
