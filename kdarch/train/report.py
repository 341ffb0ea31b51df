"""The distillation report: report.json (machine-readable), report.md (for people), plots.

The question a distillation run answers is whether the teacher made the student better than training the
same architecture on the same tokens alone, and by how much of the possible margin: the gap closed,
(scratch − student) / (scratch − teacher) on held-out loss — 1.0 means the student matches the teacher,
0 means distillation bought nothing, negative means it hurt. Plots need matplotlib (`pip install
kdarch[bench]`); without it the report says so and the JSON / Markdown are written regardless.
"""
from __future__ import annotations

import math
from pathlib import Path

from kdarch.io import write_json, write_text

MODEL_KEYS = ("teacher", "student", "scratch")
COLUMNS = (("eval_loss", "held-out loss", "{:.4f}"), ("perplexity", "perplexity", "{:.2f}"),
           ("top1_agreement", "top-1 agreement with teacher", "{:.3f}"),
           ("params_total", "parameters", "{:,}"), ("params_active", "active / token", "{:,}"),
           ("kv_cache_bytes_per_token", "KV bytes / token", "{:,}"),
           ("generate_tokens_per_s", "generate tok/s", "{:.0f}"), ("peak_memory_mb", "peak RSS MiB", "{:.0f}"),
           ("train_seconds", "train s", "{:.0f}"), ("train_tokens", "train tokens", "{:,}"))


def gap_closed(report: dict) -> float | None:
    """(scratch − student) / (scratch − teacher) on eval_loss, when all three were measured."""
    try:
        t, s, b = (report[k]["eval_loss"] for k in MODEL_KEYS)
    except KeyError:
        return None
    return (b - s) / (b - t) if b != t else None


def _fmt(value, pattern: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return pattern.format(value)


def markdown(report: dict) -> str:
    rows = [(k, report[k]) for k in MODEL_KEYS if k in report]
    rows += [(f"chain: {r['name']}", r) for r in report.get("chain", [])[1:]]
    lines = ["# kdarch distillation report", ""]
    lines += ["| model | " + " | ".join(c[1] for c in COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for name, r in rows:
        lines.append(f"| {name} | " + " | ".join(_fmt(r.get(k), p) for k, _, p in COLUMNS) + " |")
    lines.append("")
    gap = report.get("gap_closed")
    if gap is not None:
        s, b = report["student"]["eval_loss"], report["scratch"]["eval_loss"]
        verdict = "beats" if s < b else "does not beat"
        lines += [f"The distilled student {verdict} the same architecture trained from scratch on the same tokens: "
                  f"held-out loss {s:.4f} vs {b:.4f}; gap closed (scratch − student) / (scratch − teacher) = "
                  f"{gap:.1%}.", ""]
    if "arithmetic" in report:
        a = report["arithmetic"]
        lines += ["## Reasoning distillation (arithmetic)", "",
                  "| model | exact match |", "|---|---|"]
        lines += [f"| {k} | {a[k]['exact_match']:.1%} |" for k in MODEL_KEYS if k in a]
        lines += ["", f"Curation: {a['curation']}", ""]
    lines += [f"Plots: {', '.join(report['plots'])}" if report.get("plots") else
              f"Plots: not drawn ({report.get('plots_note', 'none')})", "",
              f"Total wall time: {report.get('wall_seconds', float('nan')):.0f} s", ""]
    return "\n".join(lines)


def plot(out: Path, report: dict, curves: dict[str, list[dict]]) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, rows in curves.items():
        rows = [r for r in rows if "loss" in r]
        if rows:
            ax.plot([r["tokens"] for r in rows], [r.get("lm_loss", r.get("hard_ce", r["loss"])) for r in rows],
                    label=name)
    ax.set(xlabel="training tokens", ylabel="next-token cross-entropy (train batch)", title="Training curves")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "loss_curves.png", dpi=120)
    files.append("loss_curves.png")
    plt.close(fig)

    names = [k for k in MODEL_KEYS if "eval_loss" in report.get(k, {})]
    if names:
        fig, ax = plt.subplots(figsize=(5, 4))
        bars = ax.bar(names, [report[k]["eval_loss"] for k in names], color=["#555", "#2a7", "#c63"][:len(names)])
        ax.bar_label(bars, fmt="%.3f")
        ax.set(ylabel="held-out loss (lower is better)", title="Teacher vs distilled vs scratch")
        fig.tight_layout()
        fig.savefig(out / "comparison.png", dpi=120)
        files.append("comparison.png")
        plt.close(fig)
    return files


def write_report(out: Path, report: dict, curves: dict[str, list[dict]], run=None) -> Path:
    """Fill in gap_closed and plots, write out/report.json and out/report.md; returns the JSON path."""
    out = Path(out)
    gap = gap_closed(report)
    if gap is not None:
        report["gap_closed"] = gap
        report["student_beats_scratch"] = report["student"]["eval_loss"] < report["scratch"]["eval_loss"]
    try:
        report["plots"] = plot(out, report, curves)
    except ImportError:
        report["plots"], report["plots_note"] = [], "matplotlib is not installed: pip install kdarch[bench]"
    if run is not None:
        write_text(out / "config.toml", run.to_toml())
    write_text(out / "report.md", markdown(report))
    write_json(out / "report.json", report, indent=2)
    return out / "report.json"
