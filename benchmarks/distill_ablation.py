"""What closes the gap: the embedded default run once, then one distilled student per lever against its teacher.

    python benchmarks/distill_ablation.py                       # every lever, 2 threads per run (as kdarch distill)
    python benchmarks/distill_ablation.py --levers default "init=teacher" --publish

The default run (`kdarch distill`) trains the teacher, the distilled student and the scratch student; each
lever then distils one more student from that same teacher (`--distill.teacher`), with the default's data,
steps and seed, so only the lever differs (and trains a scratch student too where the lever changes the
student's architecture). Gap closed = (scratch − student) / (scratch − teacher) on the held-out loss. A lever
is a set of `--section.field VALUE` flags; the names below are shorthands. The given teacher runs in float32,
as the default run's own teacher does (its "auto" dtype would be bfloat16 on a CPU with native bf16). Output: a
table, benchmarks/results/distill_ablation.csv, and distill_ablation.png (gap closed per lever) with matplotlib;
--publish copies both to benchmarks/measured/.
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import MEASURED_DIR, RESULTS_DIR, cpu_model, print_table, row, write_csv  # noqa: E402


def lever(alpha="auto", mtp_weight=0.1, *extra: str, init="auto") -> list[str]:
    """Flags of one lever, every setting the ablation varies spelled out (so a row reads the same whatever the
    defaults become)."""
    return ["--distill.alpha", alpha, "--model.mtp_loss_weight", str(mtp_weight), "--distill.student_init", init,
            *extra]


LEVERS = {
    "default": lever(),
    "alpha=0.9": lever("constant:0.9"),
    "alpha=0.8": lever("constant:0.8"),
    "alpha=0.3": lever("constant:0.3"),
    "alpha=0 (no KD)": lever("constant:0.0"),
    "alpha=linear:0.9->0": lever("linear:0.9->0.0"),
    "alpha=adaptive:0.9->0.1": lever("adaptive:0.9->0.1"),
    "mtp_weight=0.05": lever("constant:0.5", 0.05),
    "lr=2e-3": lever("constant:0.5", 0.1, "--train.lr", "2e-3"),
    "feature KD 1.0": lever("constant:0.5", 0.1, "--distill.feature_weight", "1.0"),
    "relation KD 1.0": lever("constant:0.5", 0.1, "--distill.relation_weight", "1.0"),
    "on-policy 0.25": lever("constant:0.5", 0.1, "--distill.on_policy", "0.25", "--distill.on_policy_start", "0.5"),
    "alpha=0.9, mtp_weight=0.05": lever("constant:0.9", 0.05),
    "alpha=0.9, lr=2e-3": lever("constant:0.9", 0.1, "--train.lr", "2e-3"),
    "alpha=0.9, feature KD 1.0": lever("constant:0.9", 0.1, "--distill.feature_weight", "1.0"),
    "alpha=0.9, relation KD 1.0": lever("constant:0.9", 0.1, "--distill.relation_weight", "1.0"),
    "alpha=0.9, on-policy 0.25": lever("constant:0.9", 0.1, "--distill.on_policy", "0.25",
                                       "--distill.on_policy_start", "0.5"),
    "init=random": lever(init="random"),
    "init=random, alpha=0.5": lever("constant:0.5", init="random"),
    "init=random, alpha=adaptive:0.9->0.1": lever("adaptive:0.9->0.1", init="random"),
    "init=random, alpha=0.5, mtp_weight=0.3": lever("constant:0.5", 0.3, init="random"),
    "init=random, alpha=0.8, mtp_weight=0.3": lever("constant:0.8", 0.3, init="random"),
    "init=random, alpha=0.9, mtp_weight=0.3": lever("constant:0.9", 0.3, init="random"),
    "init=random, alpha=0.95, mtp_weight=0.3": lever("constant:0.95", 0.3, init="random"),
    "init=random, alpha=1, mtp_weight=0.3": lever("constant:1.0", 0.3, init="random"),
    "init=random, alpha=linear:1->0.8, mtp_weight=0.3": lever("linear:1.0->0.8", 0.3, init="random"),
    "init=random, alpha=0.5, T=2, mtp_weight=0.3": lever("constant:0.5", 0.3, "--distill.temperature",
                                                         "constant:2.0", init="random"),
    "init=random, alpha=0.9, T=2, mtp_weight=0.3": lever("constant:0.9", 0.3, "--distill.temperature",
                                                         "constant:2.0", init="random"),
    "init=random, alpha=0.9, top_k=64, mtp_weight=0.3": lever("constant:0.9", 0.3, "--distill.top_k", "64",
                                                              init="random"),
    "init=random, alpha=0.5, no MTP KD, mtp_weight=0.3": lever("constant:0.5", 0.3, "--distill.mtp", "false",
                                                               init="random"),
    "init=random, alpha=0.7, no MTP KD, mtp_weight=0.3": lever("constant:0.7", 0.3, "--distill.mtp", "false",
                                                               init="random"),
    "init=random, alpha=0.9, no MTP KD, mtp_weight=0.3": lever("constant:0.9", 0.3, "--distill.mtp", "false",
                                                               init="random"),
}
"""The student's MTP loss weight is also the scratch student's (same architecture): each weight gets its own
scratch run (and a lever that changes the scratch student's training, the learning rate, gets its own too).
The default student starts from the teacher's weights (`distill.student_init`, kdarch.distill.inherit); `init=random`
rows start it at random, as the scratch student always does. Without MTP KD (`distill.mtp = false`) the
student's MTP module is not trained at all, while the scratch student's is: a row that is not like for like,
kept to show what MTP costs the main head."""


def scratch_key(flags: list[str]) -> tuple:
    """The flags a scratch student shares with its distilled twin (model and training, not distillation): levers
    with the same key share one scratch run."""
    pairs = zip(flags[::2], flags[1::2])
    return tuple(sorted((f, v) for f, v in pairs if f.startswith(("--model.", "--train."))))


def kdarch(*flags: str) -> dict:
    subprocess.run([sys.executable, "-m", "kdarch", "distill", *flags], check=True, stdout=subprocess.DEVNULL)
    out = Path(flags[flags.index("--out") + 1])
    return json.loads((out / "report.json").read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--levers", nargs="+", choices=sorted(LEVERS), default=sorted(LEVERS))
    p.add_argument("--threads", type=int, default=2, help="torch threads of every run (results depend on it)")
    p.add_argument("--dir", type=Path, default=Path("runs/ablation"), help="where the runs go")
    p.add_argument("--out", default="distill_ablation", help="CSV / PNG name under benchmarks/results/")
    p.add_argument("--publish", action="store_true", help="also write the CSV and plot to benchmarks/measured/")
    p.add_argument("--teacher-steps", type=int, default=0, help="the default run's teacher steps (0: the default's)")
    args = p.parse_args()
    common = ["--train.threads", str(args.threads)]
    teacher_steps = ["--teacher.train.steps", str(args.teacher_steps)] if args.teacher_steps else []
    base = kdarch("--out", str(args.dir / "default"), *common, *teacher_steps, *LEVERS["default"])
    teacher_dir, teacher = str(args.dir / "default" / "teacher" / "model"), base["teacher"]["eval_loss"]
    scratch = {scratch_key(LEVERS["default"]): base["scratch"]["eval_loss"]}
    rows, lines, gaps = [], [], {}
    machine = f"{cpu_model()}, {args.threads} thread(s)"
    for name in args.levers:
        key = scratch_key(LEVERS[name])
        report = base if name == "default" else kdarch(
            "--out", str(args.dir / re.sub(r"[^\w.=+-]", "_", name)), "--distill.teacher", teacher_dir,
            "--distill.teacher_dtype", "float32", "--scratch", "false" if key in scratch else "true", *common,
            *LEVERS[name])
        scratch.setdefault(key, report.get("scratch", {}).get("eval_loss"))
        loss, accept = report["student"]["eval_loss"], report["student"].get("mtp_acceptance")
        gaps[name] = (scratch[key] - loss) / (scratch[key] - teacher)
        setup = {"machine": machine, "teacher_loss": teacher, "scratch_loss": scratch[key]}
        rows += [row("distill_ablation", name, "student", "gap_closed", "ratio", "lever", name, gaps[name], setup),
                 row("distill_ablation", name, "student", "eval_loss", "nats", "lever", name, loss, setup)]
        if accept is not None:
            rows.append(row("distill_ablation", name, "student", "mtp_acceptance", "ratio", "lever", name, accept,
                            setup))
        lines.append([name, f"{loss:.4f}", f"{scratch[key]:.4f}", f"{gaps[name]:.1%}",
                      "–" if accept is None else f"{accept:.1%}", f"{report['student']['train_seconds']:.0f}"])
        print(f"  {name}: held-out loss {loss:.4f}, gap closed {gaps[name]:.1%}", flush=True)
    print(f"\nteacher {teacher:.4f} (the default run; {machine})")
    print_table(["lever", "student loss", "scratch loss", "gap closed", "MTP acceptance", "student train s"], lines)
    print(f"CSV: {write_csv(args.out, rows)}")
    if args.publish:
        write_csv(args.out, rows, MEASURED_DIR)
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
    ax.set_title(f"gap closed per lever (teacher {teacher:.3f}; {machine})", fontsize=8)
    fig.tight_layout()
    for out_dir in (RESULTS_DIR, MEASURED_DIR) if args.publish else (RESULTS_DIR,):
        fig.savefig(out_dir / f"{args.out}.png", dpi=120)
        print(f"plot: {out_dir / f'{args.out}.png'}")


if __name__ == "__main__":
    main()
