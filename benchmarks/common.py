"""Shared helpers for kdarch benchmarks: CPU timing with quantiles, peak-memory probes, CSV + table output.

Every benchmark measures kdarch side by side with its baselines in one run and writes long-form CSV rows
(kernel, provider, mode, metric, unit, x_name, x_value, p50, p20, p80, config, device, timestamp, version).
"""
from __future__ import annotations

import csv
import datetime as _dt
import json
import os
import platform
import resource
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

RESULTS_DIR = Path(os.environ.get("KDARCH_BENCH_RESULTS") or Path(__file__).resolve().parent / "results")
"""Where CSVs go: benchmarks/results, or $KDARCH_BENCH_RESULTS (the GPU suite points every benchmark at its own)."""
MEASURED_DIR = Path(__file__).resolve().parent / "measured"
"""The published copy of a run (`--publish`): the CSVs and plots the README cites, kept in the repository."""
CSV_FIELDS = ["kernel", "provider", "mode", "metric", "unit", "x_name", "x_value", "p50", "p20", "p80", "config",
              "device", "timestamp", "version"]


def quantiles(samples: list[float]) -> tuple[float, float, float]:
    """(p50, p20, p80) of the samples."""
    s = sorted(samples)
    if len(s) == 1:
        return s[0], s[0], s[0]
    q = statistics.quantiles(s, n=10, method="inclusive")
    return statistics.median(s), q[1], q[7]


def time_cpu(fn: Callable[[], object], warmup: int = 2, repeat: int = 5) -> list[float]:
    """Wall-clock seconds of `repeat` calls after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def rss_mb() -> float:
    """Current resident set size of this process in MiB (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def peak_rss_mb() -> float:
    """High-water resident set size of this process in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"cpu:{platform.processor() or platform.machine()}:{torch.get_num_threads()}threads"


def cpu_model() -> str:
    """The CPU's model name and the vector ISA torch dispatches to here (AVX512 / AVX2 / ...), for tables."""
    try:
        name = next(ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                    if ln.startswith("model name"))
    except (OSError, StopIteration):
        name = platform.processor() or platform.machine()
    return f"{name}, {torch.backends.cpu.get_cpu_capability()}, {os.cpu_count()} cores"


def row(kernel: str, provider: str, mode: str, metric: str, unit: str, x_name: str, x_value, samples_or_value,
        config: dict | str) -> dict:
    vals = samples_or_value if isinstance(samples_or_value, list) else [samples_or_value]
    p50, p20, p80 = quantiles(vals)
    from kdarch import __version__
    return {"kernel": kernel, "provider": provider, "mode": mode, "metric": metric, "unit": unit, "x_name": x_name,
            "x_value": x_value, "p50": p50, "p20": p20, "p80": p80,
            "config": config if isinstance(config, str) else json.dumps(config, sort_keys=True),
            "device": device_name(), "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "version": f"kdarch {__version__}, torch {torch.__version__}"}


def write_csv(name: str, rows: list[dict], out_dir: Path | None = None) -> Path:
    out_dir = out_dir or RESULTS_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.csv"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        w.writeheader()
        w.writerows(rows)
    return path


def print_table(headers: list[str], lines: list[list]) -> None:
    cells = [[str(c) for c in line] for line in lines]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths)))
    print("  ".join("-" * w for w in widths))
    for c in cells:
        print("  ".join(v.ljust(w) for v, w in zip(c, widths)))


def plot_metric(rows: list[dict], panels: list[tuple[str, str]], path: Path, title: str) -> Path | None:
    """One panel per (kernel, metric): each provider's p50 against x_value (numeric x on a log2 axis, otherwise
    categories in row order). None (and no file) without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 3.8), squeeze=False)
    for ax, (kernel, metric) in zip(axes[0], panels):
        sel = [r for r in rows if r["kernel"] == kernel and r["metric"] == metric]
        xs = list(dict.fromkeys(r["x_value"] for r in sel))
        numeric = all(isinstance(x, (int, float)) for x in xs)
        for provider in dict.fromkeys(r["provider"] for r in sel):
            pts = [(r["x_value"] if numeric else xs.index(r["x_value"]), r["p50"]) for r in sel
                   if r["provider"] == provider]
            ax.plot(*zip(*sorted(pts)), marker="o", label=provider)
        if numeric:
            ax.set_xscale("log", base=2)
        else:
            ax.set_xticks(range(len(xs)), [str(x) for x in xs], rotation=30, fontsize=7)
        unit = sel[0]["unit"] if sel else ""
        ax.set(xlabel=sel[0]["x_name"] if sel else "", ylabel=f"{metric} ({unit})", title=f"{kernel}: {metric}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
