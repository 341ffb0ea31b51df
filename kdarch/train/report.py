"""The distillation report: report.json (machine-readable), report.md (for people), plots.

The question a distillation run answers is whether the teacher made the student better than training the
same architecture on the same tokens alone, and by how much of the possible margin: the gap closed,
(scratch − student) / (scratch − teacher) on held-out loss — 1.0 means the student matches the teacher,
0 means distillation bought nothing, negative means it hurt.

A short run on a few held-out sequences gives losses that differ by noise. Every eval loss therefore comes
with its standard error over held-out sequences, and student and scratch — scored on the same sequences —
with the 95% interval of their paired difference (a bootstrap over sequences: resampling whole sequences keeps
the correlation of tokens within one). The report says the student beats (or loses to) scratch only when that
interval excludes zero, and "no measurable difference" otherwise. Plots need matplotlib (`pip install
kdarch[bench]`); without it the report says so and the JSON / Markdown are written regardless.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from kdarch.io import write_json, write_text

MODEL_KEYS = ("teacher", "student", "scratch")
COLORS = {"teacher": "#4c4c4c", "student": "#1f9e74", "scratch": "#d0602a"}
"""One colour per model, in every figure (further students of a chain take the default cycle)."""
COLUMNS = (("eval_loss", "held-out loss", "{:.4f}"), ("eval_loss_se", "± s.e.", "{:.4f}"),
           ("perplexity", "perplexity", "{:.2f}"), ("bits_per_byte", "bits / byte", "{:.4f}"),
           ("top1_agreement", "top-1 agreement with teacher", "{:.3f}"),
           ("params_total", "parameters", "{:,}"), ("params_active", "active / token", "{:,}"),
           ("kv_cache_bytes_per_token", "KV bytes / token", "{:,}"),
           ("generate_tokens_per_s", "generate tok/s", "{:.0f}"), ("mtp_acceptance", "MTP acceptance", "{:.1%}"),
           ("speculative_speedup", "speculative / greedy", "{:.2f}x"), ("peak_memory_mb", "peak MiB", "{:.0f}"),
           ("train_seconds", "train s", "{:.0f}"), ("train_tokens", "train tokens", "{:,}"), ("device", "device", "{}"))
BOOTSTRAP_SAMPLES = 2000


def _resampled_losses(rows: list[dict], samples: int = BOOTSTRAP_SAMPLES, seed: int = 0) -> np.ndarray:
    """[len(rows), samples] held-out losses (sum of CE / sum of tokens) of each model on the same bootstrap
    resamples of the held-out sequences, which all rows must share."""
    nll = np.array([r["per_sequence"]["nll"] for r in rows], dtype=np.float64)
    tok = np.array([r["per_sequence"]["tokens"] for r in rows], dtype=np.float64)
    idx = np.random.default_rng(seed).integers(0, nll.shape[1], size=(samples, nll.shape[1]))
    return nll[:, idx].sum(-1) / tok[:, idx].sum(-1)


def add_uncertainty(report: dict) -> None:
    """eval_loss_se for every model scored per sequence, and for student vs scratch the paired difference with
    its 95% interval and the verdict ("beats", "loses to", "no measurable difference")."""
    rows = [report[k] for k in MODEL_KEYS if "per_sequence" in report.get(k, {})]
    for r in rows:
        r["eval_loss_se"] = float(_resampled_losses([r]).std(ddof=1))
    s, b = report.get("student", {}), report.get("scratch", {})
    if "per_sequence" in s and "per_sequence" in b and s["per_sequence"]["tokens"] == b["per_sequence"]["tokens"]:
        diff = np.subtract(*_resampled_losses([s, b]))
        lo, hi = np.percentile(diff, [2.5, 97.5])
        verdict = "beats" if hi < 0 else "loses to" if lo > 0 else "no measurable difference"
        report["student_minus_scratch"] = {"eval_loss": s["eval_loss"] - b["eval_loss"], "ci95": [float(lo),
                                                                                                 float(hi)],
                                           "verdict": verdict}


def gap_closed(report: dict, key: str = "eval_loss") -> float | None:
    """(scratch − student) / (scratch − teacher) on `key` (eval_loss, or bits_per_byte: the one that compares
    across tokenizers), when all three were measured."""
    try:
        t, s, b = (report[k][key] for k in MODEL_KEYS)
    except KeyError:
        return None
    return (b - s) / (b - t) if b != t else None


def _fmt(value, pattern: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return pattern.format(value)


def _verdict_sentence(report: dict) -> list[str]:
    d = report.get("student_minus_scratch")
    if d is None:
        return []
    s, b = report["student"]["eval_loss"], report["scratch"]["eval_loss"]
    lo, hi = d["ci95"]
    n = len(report["student"]["per_sequence"]["tokens"])
    head = {"beats": "The distilled student beats", "loses to": "The distilled student loses to",
            "no measurable difference": "There is no measurable difference between the distilled student and"}
    sentence = (f"{head[d['verdict']]} the same architecture trained from scratch on the same tokens: held-out loss "
                f"{s:.4f} vs {b:.4f}, difference {d['eval_loss']:+.4f} (95% interval [{lo:+.4f}, {hi:+.4f}] over "
                f"{n} held-out sequences)")
    gap, per_byte = report.get("gap_closed"), report.get("gap_closed_bits_per_byte")
    if gap is not None and d["verdict"] != "no measurable difference":
        sentence += f"; gap closed (scratch − student) / (scratch − teacher) = {gap:.1%}"
        if gap > 1:
            sentence += " (above 100%: the student ends below its teacher's held-out loss)"
    elif per_byte is not None and d["verdict"] != "no measurable difference":  # a teacher of another tokenizer
        sentence += f"; gap closed in bits per byte (the teacher's tokens are other ones) = {per_byte:.1%}"
    if init := report["student"].get("init"):
        sentence += (f". The student started from its teacher's weights ({init}; distill.student_init), the scratch "
                     f"student from its random initialisation")
    return [sentence + ".", ""]


def markdown(report: dict) -> str:
    rows = [(k, report[k]) for k in MODEL_KEYS if k in report]
    rows += [(f"chain: {r['name']}", r) for r in report.get("chain", [])[1:]]
    lines = ["# kdarch distillation report", "", f"Teacher: {report.get('teacher', {}).get('source', 'unknown')}", ""]
    lines += ["| model | " + " | ".join(c[1] for c in COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for name, r in rows:
        lines.append(f"| {name} | " + " | ".join(_fmt(r.get(k), p) for k, _, p in COLUMNS) + " |")
    lines += ["", "Peak memory is training's: the CUDA allocator's peak on a GPU, the process's resident set on the "
              "CPU.", "", *_verdict_sentence(report)]
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

    teacher = report.get("teacher", {}).get("source", "teacher")
    files = []
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, rows in curves.items():
        rows = [r for r in rows if "loss" in r]
        if rows:
            ax.plot([r["tokens"] for r in rows], [r.get("lm_loss", r.get("hard_ce", r["loss"])) for r in rows],
                    label=name, color=COLORS.get(name))
    ax.set(xlabel="training tokens", ylabel="next-token cross-entropy (train batch)",
           title=f"Training curves (teacher: {teacher})")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "loss_curves.png", dpi=120)
    files.append("loss_curves.png")
    plt.close(fig)

    names = [k for k in MODEL_KEYS if "eval_loss" in report.get(k, {})]
    if names:
        loss = [report[k]["eval_loss"] for k in names]
        err = [2 * report[k].get("eval_loss_se", 0.0) for k in names]
        fig, ax = plt.subplots(figsize=(6, 4.5))
        ax.errorbar(names, loss, yerr=err, fmt="none", ecolor="black", capsize=6, zorder=3)
        ax.scatter(names, loss, s=80, color=[COLORS[k] for k in names], zorder=4)
        for x, v in enumerate(loss):
            ax.annotate(f"{v:.3f}", (x, v), textcoords="offset points", xytext=(12, -4))
        span = max(v + e for v, e in zip(loss, err)) - min(v - e for v, e in zip(loss, err))
        ax.set_ylim(min(v - e for v, e in zip(loss, err)) - 0.15 * span, max(v + e for v, e in zip(loss, err))
                    + 0.15 * span)  # the differences, not the distance from zero
        ax.set_xlim(-0.5, len(names) - 0.5)
        ax.set(ylabel="held-out loss (lower is better), ± 2 s.e.", title=f"Held-out loss (teacher: {teacher})")
        d = report.get("student_minus_scratch")
        if d is not None:  # the bars overlap more than the paired comparison does: say what it gives
            lo, hi = d["ci95"]
            ax.text(0.02, 0.02, f"student − scratch, paired over the same sequences: {d['eval_loss']:+.4f} "
                    f"[{lo:+.4f}, {hi:+.4f}] ({d['verdict']})", transform=ax.transAxes, fontsize=8)
        ax.grid(axis="y", alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / "comparison.png", dpi=120)
        files.append("comparison.png")
        plt.close(fig)
    return files


def write_report(out: Path, report: dict, curves: dict[str, list[dict]], config_toml: str | None = None) -> Path:
    """Fill in the uncertainty, gap_closed and plots, write out/report.json and out/report.md (and the
    configuration that ran, out/config.toml); returns the JSON path."""
    out = Path(out)
    add_uncertainty(report)
    for name, key in (("gap_closed", "eval_loss"), ("gap_closed_bits_per_byte", "bits_per_byte")):
        if (gap := gap_closed(report, key)) is not None:
            report[name] = gap
    try:
        report["plots"] = plot(out, report, curves)
    except ImportError:
        report["plots"], report["plots_note"] = [], "matplotlib is not installed: pip install kdarch[bench]"
    if config_toml is not None:  # the configuration that ran, stage by stage
        write_text(out / "config.toml", config_toml)
    write_text(out / "report.md", markdown(report))
    write_json(out / "report.json", report, indent=2)
    return out / "report.json"
