"""What closes the gap: the embedded default run once, then one distilled student per lever against its teacher.

    python benchmarks/distill_ablation.py                       # the default levers, 1 thread per run
    python benchmarks/distill_ablation.py --levers default "alpha=0.5, mtp_weight=0.3" --threads 2

The default run (`kdarch distill`) trains the teacher, the distilled student and the scratch student; each
lever then distils one more student from that same teacher (`--distill.teacher`), with the default's data,
steps and seed, so only the lever differs (and trains a scratch student too where the lever changes the
student's architecture). Gap closed = (scratch − student) / (scratch − teacher) on the held-out loss. A lever
is a set of `--section.field VALUE` flags; the names below are shorthands. Output: a table,
benchmarks/results/distill_ablation.csv, and distill_ablation.png (gap closed per lever) with matplotlib.
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS_DIR, print_table, row, write_csv  # noqa: E402


def lever(alpha="constant:0.9", mtp_weight=0.1, *extra: str) -> list[str]:
    """Flags of one lever, every setting the ablation varies spelled out (so a row reads the same whatever the
    defaults become)."""
    return ["--distill.alpha", alpha, "--model.mtp_loss_weight", str(mtp_weight), *extra]


LEVERS = {
    "default": lever(),
    "alpha=0.5, mtp_weight=0.3": lever("constant:0.5", 0.3),
    "alpha=0.8, mtp_weight=0.3": lever("constant:0.8", 0.3),
    "alpha=0.9, mtp_weight=0.3": lever("constant:0.9", 0.3),
    "alpha=0.95, mtp_weight=0.3": lever("constant:0.95", 0.3),
    "alpha=1, mtp_weight=0.3": lever("constant:1.0", 0.3),
    "alpha=linear:1->0.8, mtp_weight=0.3": lever("linear:1.0->0.8", 0.3),
    "alpha=0.5, T=2, mtp_weight=0.3": lever("constant:0.5", 0.3, "--distill.temperature", "constant:2.0"),
    "alpha=0.9, T=2, mtp_weight=0.3": lever("constant:0.9", 0.3, "--distill.temperature", "constant:2.0"),
    "alpha=0.9, top_k=64, mtp_weight=0.3": lever("constant:0.9", 0.3, "--distill.top_k", "64"),
    "alpha=0.5, no MTP KD, mtp_weight=0.3": lever("constant:0.5", 0.3, "--distill.mtp", "false"),
    "alpha=0.7, no MTP KD, mtp_weight=0.3": lever("constant:0.7", 0.3, "--distill.mtp", "false"),
    "alpha=0.9, no MTP KD, mtp_weight=0.3": lever("constant:0.9", 0.3, "--distill.mtp", "false"),
}
"""The student's MTP loss weight is also the scratch student's (same architecture): each weight gets its own
scratch run. Without MTP KD (`distill.mtp = false`) the student's MTP module is not trained at all, while the
scratch student's is: a row that is not like for like, kept to show what MTP costs the main head."""


def kdarch(*flags: str) -> dict:
    subprocess.run([sys.executable, "-m", "kdarch", "distill", *flags], check=True, stdout=subprocess.DEVNULL)
    out = Path(flags[flags.index("--out") + 1])
    return json.loads((out / "report.json").read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--levers", nargs="+", choices=sorted(LEVERS), default=sorted(LEVERS))
    p.add_argument("--threads", type=int, default=1, help="torch threads of every run (results depend on it)")
    p.add_argument("--dir", type=Path, default=Path("runs/ablation"), help="where the runs go")
    p.add_argument("--out", default="distill_ablation", help="CSV / PNG name under benchmarks/results/")
    args = p.parse_args()
    common = ["--train.threads", str(args.threads)]
    base = kdarch("--out", str(args.dir / "default"), *common, *LEVERS["default"])
    teacher_dir, teacher = str(args.dir / "default" / "teacher" / "model"), base["teacher"]["eval_loss"]
    scratch = {LEVERS["default"][3]: base["scratch"]["eval_loss"]}  # by MTP weight
    rows, lines, gaps = [], [], {}
    for name in args.levers:
        weight = LEVERS[name][3]
        report = base if name == "default" else kdarch(
            "--out", str(args.dir / re.sub(r"[^\w.=+-]", "_", name)), "--distill.teacher", teacher_dir,
            "--scratch", "false" if weight in scratch else "true", *common, *LEVERS[name])
        scratch.setdefault(weight, report.get("scratch", {}).get("eval_loss"))
        loss = report["student"]["eval_loss"]
        gaps[name] = (scratch[weight] - loss) / (scratch[weight] - teacher)
        setup = {"threads": args.threads, "teacher_loss": teacher, "scratch_loss": scratch[weight]}
        rows += [row("distill_ablation", name, "student", "gap_closed", "ratio", "lever", name, gaps[name], setup),
                 row("distill_ablation", name, "student", "eval_loss", "nats", "lever", name, loss, setup)]
        lines.append([name, f"{loss:.4f}", f"{scratch[weight]:.4f}", f"{gaps[name]:.1%}",
                      f"{report['student']['train_seconds']:.0f}"])
        print(f"  {name}: held-out loss {loss:.4f}, gap closed {gaps[name]:.1%}", flush=True)
    print(f"\nteacher {teacher:.4f} (the default run, {args.threads} thread(s))")
    print_table(["lever", "student loss", "scratch loss", "gap closed", "student train s"], lines)
    print(f"CSV: {write_csv(args.out, rows)}")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install kdarch[bench])")
        return
    fig, ax = plt.subplots(figsize=(7, 0.4 * len(gaps) + 1))
    ax.barh(list(gaps), [100 * v for v in gaps.values()], color="#1f9e74")
    ax.axvline(50, color="#4c4c4c", linestyle="--", linewidth=1)
    ax.set_xlabel("gap closed (%)")
    fig.tight_layout()
    fig.savefig(RESULTS_DIR / f"{args.out}.png", dpi=120)
    print(f"plot: {RESULTS_DIR / f'{args.out}.png'}")


if __name__ == "__main__":
    main()
