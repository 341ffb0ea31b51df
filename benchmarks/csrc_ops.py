"""The compiled csrc/ ops (backend "cpp") beside the torch backend, in one run on the CPU.

    python benchmarks/csrc_ops.py --quick        # T = 512 / 4096 / 16384, E = 16 / 256, K = 4 / 8, ~3 minutes
    python benchmarks/csrc_ops.py                # T = 512 ... 16384, E = 16 / 64 / 256, K = 4 / 8
    python benchmarks/csrc_ops.py --only e2e     # just the training steps

Sections (ratio = torch time / cpp time, so > 1 means cpp is faster):
  bandwidth  a large tensor copy_ (read + write GB/s): the machine's memory bandwidth, for scale.
  routing    routing metadata (counts, offsets, sorted index, inverse) of topk_ids [T, K] over E experts:
             torch = argsort + searchsorted + scatter (kdarch.ops.moe.routing_metadata), cpp = one counting sort.
  permute    permute + combine as the grouped-mm MoE FFN runs them, forward and backward: gather x rows into
             expert order, un-permute + fp32 sum over the K slots; then the same two for the gradients
             (hidden --hidden, fp32).
  fp8        quantisation of activations [T, --hidden] in 1x128 tiles and of a weight [--hidden * 2, --hidden] in
             128x128 blocks, and the dequantisation of the activations (kdarch.ops.fp8, backend torch vs cpp).
  e2e        one training step (forward, backward, AdamW) of the debug preset (and, with --e2e-bench, the bench
             preset) with KDARCH_BACKEND=torch and =cpp, in high precision and with model.fp8.
GB/s = bytes an op must read and write (inputs once, outputs once) / its time. Timing: median of --repeat
calls after --warmup, providers alternated call by call (a shared machine drifts), --threads fixed (2).
Output: tables on stdout, long-form CSV in benchmarks/results/csrc_ops.csv, a plot of the speedups beside it.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS_DIR, plot_metric, print_table, quantiles, row, write_csv  # noqa: E402


def paired(fns: dict, warmup: int, repeat: int) -> dict[str, list[float]]:
    """Seconds per call of each provider, timed alternately."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    out = {k: [] for k in fns}
    for _ in range(repeat):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            out[k].append(time.perf_counter() - t0)
    return out


def med(samples: list[float]) -> float:
    return quantiles(samples)[0]


def bandwidth(args, rows) -> float:
    n = 64 * 2**20  # 256 MiB of fp32 each way
    src, dst = torch.randn(n), torch.empty(n)
    t = paired({"copy": lambda: dst.copy_(src)}, 2, args.repeat)["copy"]
    gbs = [2 * n * 4 / s / 1e9 for s in t]
    rows.append(row("bandwidth", "torch", "copy_", "bandwidth", "GB/s", "bytes", 2 * n * 4, gbs, {}))
    print(f"memory bandwidth (copy_ of 256 MiB, read + write): {med(gbs):.1f} GB/s\n")
    return med(gbs)


def report(section, rows, lines, x_name, x, cfg, times: dict, nbytes: int, label: str):
    tt, tc = med(times["torch"]), med(times["cpp"])
    for p, ts in times.items():
        rows.append(row(section, p, "fwd", "time", "us", x_name, x, [s * 1e6 for s in ts], cfg))
        rows.append(row(section, p, "fwd", "bandwidth", "GB/s", x_name, x, [nbytes / s / 1e9 for s in ts], cfg))
    rows.append(row(section, "cpp/torch", "fwd", "speedup", "x", x_name, x, tt / tc, cfg))
    lines.append([label, f"{tt * 1e6:.0f}", f"{tc * 1e6:.0f}", f"{tt / tc:.2f}", f"{nbytes / tc / 1e9:.1f}"])
    return tt / tc


def ids_for(T, E, K, g):
    return torch.rand(T, E, generator=g).topk(K, dim=1).indices


def bench_routing(args, rows, C):
    from kdarch.ops.moe import routing_metadata
    lines, ratios = [], []
    g = torch.Generator().manual_seed(0)
    for T in args.tokens:
        for E in args.experts:
            for K in args.topk:
                ids = ids_for(T, E, K, g)
                times = paired({"torch": lambda ids=ids, E=E: routing_metadata(ids, E),
                                "cpp": lambda ids=ids, E=E: C.routing(ids, E)}, args.warmup, args.repeat)
                M = T * K
                cfg = {"T": T, "E": E, "K": K}
                ratios.append(report("routing", rows, lines, "tokens", T, cfg, times, M * 8 * 3 + E * 16,
                                     f"T={T} E={E} K={K}"))
    print("routing metadata")
    print_table(["shape", "torch us", "cpp us", "speedup", "cpp GB/s"], lines)
    return ratios


def permute_combine_fns(C, x, y, sorted_idx, inv, K):
    T, lib = x.shape[0], C._lib()
    token = sorted_idx // K

    def torch_fn():  # as kdarch.ops.moe.torch_backend.grouped_ffn_fwd / _bwd run them
        x[token]
        y.float()[inv].view(T, K, -1).sum(dim=1)
        x.contiguous()[token]  # the gradient's permute (grad_out rows)
        y.float()[inv].view(T, K, -1).sum(dim=1)  # the gradient's combine

    def cpp_fn():
        lib.moe_permute(x, sorted_idx, K)
        lib.moe_unpermute(y, inv, K, None, None)
        lib.moe_permute(x, sorted_idx, K)
        lib.moe_unpermute(y, inv, K, None, None)
    return {"torch": torch_fn, "cpp": cpp_fn}


def bench_permute(args, rows, C):
    from kdarch.ops.moe import routing_metadata
    lines, ratios = [], []
    g = torch.Generator().manual_seed(1)
    H = args.hidden
    for T in args.tokens:
        for E in args.experts:
            for K in args.topk:
                ids = ids_for(T, E, K, g)
                _, _, sorted_idx, inv = routing_metadata(ids, E)
                x, y = torch.randn(T, H, generator=g), torch.randn(T * K, H, generator=g)
                times = paired(permute_combine_fns(C, x, y, sorted_idx, inv, K), args.warmup, args.repeat)
                nbytes = 2 * (T * K * H * 4 * 2 + T * H * 4 * 2)  # each pass: M rows one way, T rows the other
                ratios.append(report("permute_combine", rows, lines, "tokens", T, {"T": T, "E": E, "K": K, "H": H},
                                     times, nbytes, f"T={T} E={E} K={K}"))
    print(f"permute + combine, forward and backward (H={H}, fp32)")
    print_table(["shape", "torch us", "cpp us", "speedup", "cpp GB/s"], lines)
    return ratios


def bench_fp8(args, rows):
    from kdarch.ops import fp8 as F8
    lines, ratios = [], []
    g = torch.Generator().manual_seed(2)
    H = args.hidden
    w = torch.randn(2 * H, H, generator=g)
    tw = paired({b: (lambda b=b, w=w: F8.quantize_weight(w, backend=b)) for b in ("torch", "cpp")}, args.warmup,
                args.repeat)
    ratios.append(report("fp8_quantize_weight", rows, lines, "rows", 2 * H, {"N": 2 * H, "K": H}, tw,
                         w.numel() * 5, f"weight [{2 * H}, {H}] 128x128"))
    for T in args.tokens:
        x = torch.randn(T, H, generator=g)
        tq = paired({b: (lambda b=b, x=x: F8.quantize_act(x, backend=b)) for b in ("torch", "cpp")}, args.warmup,
                    args.repeat)
        ratios.append(report("fp8_quantize_act", rows, lines, "tokens", T, {"T": T, "K": H}, tq, x.numel() * 5,
                             f"act [{T}, {H}] 1x128"))
        q, s = F8.quantize_act(x)
        td = paired({b: (lambda b=b, q=q, s=s: F8.dequantize(q, s, backend=b)) for b in ("torch", "cpp")}, args.warmup,
                    args.repeat)
        report("fp8_dequantize", rows, lines, "tokens", T, {"T": T, "K": H}, td, x.numel() * 5,
               f"dequant [{T}, {H}]")
    print(f"FP8 e4m3 quantisation (hidden {H})")
    print_table(["op", "torch us", "cpp us", "speedup", "cpp GB/s"], lines)
    return ratios


def train_step(models, opts, ids, losses):
    def step(b):
        os.environ["KDARCH_BACKEND"] = b
        loss = models[b](ids, labels=ids, return_logits=False).loss
        opts[b].zero_grad(set_to_none=True)
        loss.backward()
        opts[b].step()
        losses.setdefault(b, loss.item())
    return step


def bench_e2e(args, rows):
    from kdarch import CausalLM, get_preset
    lines, out = [], {}
    presets = [("debug", 8, 128)] + ([("bench", 4, 256)] if args.e2e_bench else [])
    saved = os.environ.get("KDARCH_BACKEND")
    try:
        for preset, batch, seq in presets:
            for fp8 in (False, True):
                models, opts = {}, {}
                for b in ("torch", "cpp"):
                    torch.manual_seed(0)
                    models[b] = CausalLM(get_preset(preset, fp8=fp8)).train()
                    opts[b] = torch.optim.AdamW(models[b].parameters(), lr=1e-4)
                ids = torch.randint(0, get_preset(preset).vocab_size, (batch, seq),
                                    generator=torch.Generator().manual_seed(0))
                losses = {}
                step = train_step(models, opts, ids, losses)
                times = paired({b: (lambda b=b, step=step: step(b)) for b in ("torch", "cpp")}, args.warmup,
                               args.e2e_steps)
                tt, tc = med(times["torch"]), med(times["cpp"])
                cfg = {"preset": preset, "fp8": fp8, "batch": batch, "seq": seq}
                for b, ts in times.items():
                    rows.append(row("train_step", b, "fwd+bwd+adamw", "step_time", "s", "tokens", batch * seq, ts,
                                    cfg))
                rows.append(row("train_step", "cpp/torch", "fwd+bwd+adamw", "speedup", "x", "tokens", batch * seq,
                                tt / tc, cfg))
                lines.append([f"{preset}{' fp8' if fp8 else ''} {batch}x{seq}", f"{tt * 1e3:.1f}", f"{tc * 1e3:.1f}",
                              f"{tt / tc:.2f}", f"{abs(losses['torch'] - losses['cpp']):.1e}"])
                out[(preset, fp8)] = tt / tc
    finally:
        if saved is None:
            os.environ.pop("KDARCH_BACKEND", None)
        else:
            os.environ["KDARCH_BACKEND"] = saved
    print("training step (forward + backward + AdamW), KDARCH_BACKEND=torch vs =cpp")
    print_table(["model", "torch ms", "cpp ms", "speedup", "|first loss diff|"], lines)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a subset of the sweep")
    p.add_argument("--only", choices=["bandwidth", "routing", "permute", "fp8", "e2e"], action="append")
    p.add_argument("--hidden", type=int, default=256, help="row width of permute / combine and the FP8 shapes")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeat", type=int, default=9)
    p.add_argument("--e2e-steps", type=int, default=7)
    p.add_argument("--e2e-bench", action="store_true", help="also time the bench preset's step (slower)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    args.tokens = [512, 4096, 16384] if args.quick else [512, 1024, 2048, 4096, 8192, 16384]
    args.experts = [16, 256] if args.quick else [16, 64, 256]
    args.topk = [4, 8]

    from kdarch.ops.cpp import build
    from kdarch.ops.cpp import ops as C
    if not build.load():
        sys.exit(f"the compiled ops are unavailable here: {build.status()['cause']}")
    sections = args.only or ["bandwidth", "routing", "permute", "fp8", "e2e"]
    rows, summary = [], []
    print(f"{args.threads} threads, torch {torch.__version__}\n")
    if "bandwidth" in sections:
        bw = bandwidth(args, rows)
        summary.append(f"memory bandwidth {bw:.1f} GB/s (copy_)")
    for name, fn, target in (("routing", lambda: bench_routing(args, rows, C), 3.0),
                             ("permute", lambda: bench_permute(args, rows, C), 1.5),
                             ("fp8", lambda: bench_fp8(args, rows), 3.0)):
        if name in sections:
            r = fn()
            print()
            summary.append(f"{name}: speedup min {min(r):.2f}x, median {sorted(r)[len(r) // 2]:.2f}x, "
                           f"max {max(r):.2f}x (target >= {target}x)")
    if "e2e" in sections:
        for (preset, fp8), r in bench_e2e(args, rows).items():
            summary.append(f"train step {preset}{' fp8' if fp8 else ''}: {r:.2f}x")
        print()
    print("summary (cpp / torch, higher is faster):\n  " + "\n  ".join(summary))
    print(f"CSV: {write_csv('csrc_ops', rows)}")
    panels = [(k, "speedup") for k in dict.fromkeys(r["kernel"] for r in rows if r["metric"] == "speedup")]
    png = panels and plot_metric(rows, panels, RESULTS_DIR / "csrc_ops.png", "compiled ops vs torch (cpp / torch)")
    if png:
        print(f"plot: {png}")


if __name__ == "__main__":
    main()
