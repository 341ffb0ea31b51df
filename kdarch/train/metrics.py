"""What a training run reports while it runs: metrics files, the progress bar, the expert load, the machine.

`metrics.jsonl` is appended live (one JSON object per logged step) so a killed run keeps its curve, and cut
back to the checkpoint's step on resume; `metrics.csv` is rewritten at the end; TensorBoard gets the same
scalars when it is installed. The progress bar is tqdm's. The expert load is read from the device only at
logging steps.
"""
from __future__ import annotations

import csv
import json
import os
import sys
import warnings
from pathlib import Path

import torch
from tqdm import tqdm

__all__ = ["MetricsLog", "Progress", "expert_imbalance", "warn_if_oversubscribed"]


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


def expert_imbalance(loads: dict[str, torch.Tensor]) -> float | None:
    """Max over MoE layers of (max expert load / mean expert load): 1.0 when perfectly balanced."""
    if not loads:
        return None
    load_LE = torch.stack(list(loads.values()))
    ratio, total = (load_LE.amax(-1) * load_LE.shape[-1]).tolist(), load_LE.sum(-1).tolist()  # one device read
    vals = [r for r, t in zip(ratio, total) if t > 0]
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
