"""Fused distillation head vs the unfused path: peak memory and time of one forward + backward.

    python benchmarks/distill_head.py                      # N=4096, d=512, V in {32768, 131072}, fp32, 2 threads
    python benchmarks/distill_head.py --vocab 32768 --rounds 1 --providers fused naive torch
    python benchmarks/distill_head.py --device cuda --dtype bfloat16 --tokens 8192 --hidden 4096 --vocab 131072

Providers (each size and provider in its own subprocess, so peak memory is measured cleanly):
  fused  `fused_kd_loss(h, W, labels, teacher)`: chunks of tokens, never [N, V] logits;
  naive  `kd_loss(h @ W.T, teacher, labels)`: full student logits, then the (chunked) loss;
  torch  the textbook autograd formula (log_softmax at T on both sides, KL × T², F.cross_entropy),
         what users write first; optional, it needs ~7 [N, V] fp32 tensors.
The teacher is dense logits [N, V] (or its top-k with --topk K); inputs exist before the baseline.
Peak memory is the process's resident-set high-water mark during the steps minus its size before them
(on CUDA: the allocator's peak minus what the inputs hold), the largest over rounds.
Time: the best and the median over all timed steps of all rounds; the ratio
uses the best, the least disturbed step on a shared machine (the median ratio is printed beside it).
Reports a table, the ratios fused / naive (targets: <= 0.25x peak memory, <= 1.0x time), and a CSV in
benchmarks/results/distill_head.csv with a plot beside it (memory and time vs vocabulary). The loss of every
provider is printed: they must agree.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS_DIR, peak_rss_mb, plot_metric, print_table, row, rss_mb, time_cpu, write_csv  # noqa: E402


def textbook_loss(h, w, labels, teacher, kind, T, alpha):
    """Plain autograd (forward KL only): what the fused head replaces."""
    if kind != "forward_kl" or not isinstance(teacher, torch.Tensor):
        raise SystemExit("--providers torch supports --kind forward_kl with a dense teacher only")
    s = h @ w.T
    soft = F.kl_div(F.log_softmax(s / T, -1), F.log_softmax(teacher / T, -1), log_target=True,
                    reduction="batchmean") * T * T
    return alpha * soft + (1 - alpha) * F.cross_entropy(s, labels)


def worker(args) -> None:
    from kdarch.distill import TopKTeacher, fused_kd_loss, kd_loss
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    N, d, V = args.tokens, args.hidden, args.vocab
    dev, dtype = torch.device(args.device), getattr(torch, args.dtype)
    h = torch.randn(N, d, device=dev, dtype=dtype).requires_grad_()
    w = torch.randn(V, d, device=dev, dtype=dtype).mul_(d ** -0.5).requires_grad_()
    if args.topk:  # built in row blocks: no [N, V] transient may raise the high-water mark before the baseline
        parts = [TopKTeacher.from_logits(torch.randn(min(256, N - i), V, device=dev).mul_(2.0), args.topk)
                 for i in range(0, N, 256)]
        teacher = TopKTeacher(torch.cat([q.ids for q in parts]), torch.cat([q.values for q in parts]), "logprobs",
                              torch.cat([q.tail_mass for q in parts]), args.topk_mode)
    else:
        teacher = torch.randn(N, V, device=dev).mul_(2.0).to(dtype)
    labels = torch.randint(0, V, (N,), device=dev)
    opts = dict(kind=args.kind, temperature=args.temperature, alpha=args.alpha)
    losses = []

    def step():
        h.grad = w.grad = None
        if args.worker == "fused":
            loss = fused_kd_loss(h, w, labels, teacher, **opts)
        elif args.worker == "naive":
            loss = kd_loss(h @ w.T, teacher, labels, **opts)
        else:
            loss = textbook_loss(h, w, labels, teacher, args.kind, args.temperature, args.alpha)
        loss.backward()
        losses.append(loss.item())

    if dev.type == "cuda":  # the allocator's peak above what the inputs hold; loss.item() syncs each step
        base = torch.cuda.memory_allocated(dev) / 2**20
        torch.cuda.reset_peak_memory_stats(dev)
        times = time_cpu(step, warmup=args.warmup, repeat=args.repeat)
        peak = torch.cuda.max_memory_allocated(dev) / 2**20 - base
    else:
        base = rss_mb()
        times = time_cpu(step, warmup=args.warmup, repeat=args.repeat)
        peak = peak_rss_mb() - base
    print(json.dumps({"times": times, "loss": losses[0], "peak_mb": peak}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--vocab", type=int, nargs="+", default=[32768, 131072])
    p.add_argument("--providers", nargs="+", default=["fused", "naive"], choices=["fused", "naive", "torch"])
    p.add_argument("--kind", default="forward_kl")
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--topk", type=int, default=0, help="teacher as its top-k (0: dense logits)")
    p.add_argument("--topk-mode", default="tail", choices=["tail", "renormalise"])
    p.add_argument("--repeat", type=int, default=2, help="timed steps per subprocess")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--rounds", type=int, default=2, help="subprocesses per provider and size, in alternating order")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="h, W and the teacher")
    p.add_argument("--out", default="distill_head", help="CSV name under benchmarks/results/")
    p.add_argument("--worker", choices=["fused", "naive", "torch"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        args.vocab = args.vocab[0]
        return worker(args)

    rows, lines, results, setups = [], [], {}, {}
    teacher = f"top-{args.topk} {args.topk_mode}" if args.topk else "dense"
    for V in args.vocab:
        setups[V] = setup = {"tokens": args.tokens, "hidden": args.hidden, "vocab": V, "kind": args.kind,
                             "T": args.temperature, "alpha": args.alpha, "teacher": teacher, "threads": args.threads,
                             "dtype": args.dtype, "device": args.device}
        for rnd in range(args.rounds):  # alternate the order: a shared machine's load drifts
            for provider in args.providers[::-1] if rnd % 2 else args.providers:
                cmd = [sys.executable, __file__, "--worker", provider, "--vocab", str(V)] + \
                    [f"--{k}={getattr(args, k.replace('-', '_'))}" for k in ("tokens", "hidden", "kind", "temperature",
                     "alpha", "topk", "topk-mode", "repeat", "warmup", "threads", "device", "dtype")]
                out = subprocess.run(cmd, capture_output=True, text=True)
                if out.returncode != 0:
                    print(f"{provider} V={V} failed (rc {out.returncode}): {out.stderr.strip()[-300:]}",
                          file=sys.stderr)
                    continue
                r = json.loads(out.stdout.strip().splitlines()[-1])
                steps = ", ".join(f"{t:.2f}" for t in r["times"])
                print(f"  V={V} {provider}: steps {steps} s, {r['peak_mb']:.0f} MiB", flush=True)
                acc = results.setdefault((V, provider), {"times": [], "peaks": [], "loss": r["loss"]})
                acc["times"] += r["times"]
                acc["peaks"].append(r["peak_mb"])
        for provider in args.providers:
            r = results.get((V, provider))
            if r is None:
                continue
            r["best"], r["peak_mb"] = min(r["times"]), max(r["peaks"])
            r["p50"] = sorted(r["times"])[(len(r["times"]) - 1) // 2]
            rows += [row("distill_head", provider, "fwd+bwd", "time", "s", "vocab", V, r["times"], setup),
                     row("distill_head", provider, "fwd+bwd", "peak_memory", "MiB", "vocab", V, r["peak_mb"], setup)]
            lines.append([V, provider, f"{r['best']:.2f}", f"{r['p50']:.2f}", f"{r['peak_mb']:.0f}",
                          f"{r['loss']:.6f}"])
    print(f"\nKD head fwd+bwd, N={args.tokens} d={args.hidden}, {args.kind} T={args.temperature} alpha={args.alpha}, "
          f"teacher {teacher}, {args.dtype} on {args.device}" + (f", {args.threads} threads" * (args.device == "cpu")))
    print_table(["V", "provider", "best s", "median s", "peak MiB", "loss"], lines)
    print()
    for V in args.vocab:
        f = results.get((V, "fused"))
        for peer in ("naive", "torch"):
            q = results.get((V, peer))
            if f is None or q is None:
                continue
            mem, speed, speed50 = f["peak_mb"] / q["peak_mb"], f["best"] / q["best"], f["p50"] / q["p50"]
            rows += [row("distill_head", f"fused/{peer}", "fwd+bwd", "memory_ratio", "x", "vocab", V, mem, setups[V]),
                     row("distill_head", f"fused/{peer}", "fwd+bwd", "time_ratio", "x", "vocab", V, speed, setups[V])]
            print(f"V={V}: fused / {peer}: {mem:.3f}x peak memory (target <= 0.25x), {speed:.2f}x best time "
                  f"({speed50:.2f}x median; target <= 1.0x), loss difference {abs(f['loss'] - q['loss']):.1e}")
    print(f"CSV: {write_csv(args.out, rows)}")
    png = plot_metric([r for r in rows if "/" not in r["provider"]], [("distill_head", "peak_memory"),
                      ("distill_head", "time")], RESULTS_DIR / f"{args.out}.png",
                      f"KD head fwd+bwd, N={args.tokens} d={args.hidden}, teacher {teacher}, {args.dtype}")
    if png:
        print(f"plot: {png}")


if __name__ == "__main__":
    main()
