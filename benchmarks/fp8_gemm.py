"""FP8 block-scaled GEMM: kdarch beside torch bf16 / fp32 matmul, torch._scaled_mm and Transformer Engine, one run.

    python benchmarks/fp8_gemm.py                    # scaled-down DeepSeek-V3 shapes (CPU: about a minute)
    python benchmarks/fp8_gemm.py --shapes full      # the DeepSeek-V3 shapes (GPU; on 2 CPU cores ~10 min)
    python benchmarks/fp8_gemm.py --shapes 4096x32768x512 --repeat 1 --warmup 0

Shapes are M×N×K (C[M, N] = X[M, K]·W[N, K]ᵀ): DeepSeek-V3's 4096×7168×16384, 4096×24576×1536 (wq_b) and
4096×32768×512 (wkv_b); "small" divides M by 8 and N, K by 4 (K kept ≥ 128).
Providers (operands quantised beforehand, as in DeepGEMM's benchmarks; the "+quant" row adds the
1×128 activation quantisation, the weight being quantised once per step in training):
  kdarch        kdarch.ops.fp8.fp8_gemm, backend auto (CPU: torch = dequantise + fp32 matmul; CUDA: Triton)
  kdarch+quant  quantize_act(x) then fp8_gemm
  torch_bf16    x_bf16 @ w_bf16ᵀ          torch_fp32  x @ wᵀ (the CPU's fastest dense path here)
  scaled_mm_tensor / scaled_mm_row   torch._scaled_mm with one scale per tensor / per row of X and W: the
                coarser scalings it supports on the CPU (it has no 1×128 / 128×128 block scaling there)
  scaled_mm_block  (CUDA) torch._scaled_mm with DeepSeek's block scales, where this torch supports it
  te            (CUDA + transformer-engine) te.Linear forward under the Float8BlockScaling recipe
Metrics: p50 time, GFLOP/s (TFLOP/s on CUDA), speed over torch_bf16 and torch_fp32, relative Frobenius
error of the output against the fp32 product. CSV: benchmarks/results/fp8_gemm.csv, and a plot beside it.
Timing: CPU = median of --repeat calls after --warmup at fixed --threads; CUDA = triton.testing.do_bench.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS_DIR, plot_metric, print_table, row, time_cpu, write_csv  # noqa: E402

from kdarch.kernels.fp8_ref import rel_err  # noqa: E402
from kdarch.ops.fp8 import fp8_gemm, quantize_act, quantize_weight  # noqa: E402

FULL = ((4096, 7168, 16384), (4096, 24576, 1536), (4096, 32768, 512))
SMALL = tuple((m // 8, n // 4, max(128, k // 4)) for m, n, k in FULL)
FP8 = torch.float8_e4m3fn


def _scaled_mm_row(x, w):
    """Per-row scales for X and W (one scale per output row / column), one _scaled_mm call."""
    sx, sw = x.abs().amax(1, keepdim=True).clamp_min(1e-4) / 448, w.abs().amax(1, keepdim=True).clamp_min(1e-4) / 448
    xq, wq = (x / sx).to(FP8), (w / sw).to(FP8)
    return lambda: torch._scaled_mm(xq, wq.T, scale_a=sx, scale_b=sw.T.contiguous(), out_dtype=torch.bfloat16)


def _scaled_mm_tensor(x, w):
    sx, sw = x.abs().max() / 448, w.abs().max() / 448
    xq, wq = (x / sx).to(FP8), (w / sw).to(FP8)
    return lambda: torch._scaled_mm(xq, wq.T, scale_a=sx, scale_b=sw, out_dtype=torch.bfloat16)


def _scaled_mm_block(xq, xs, wq, ws):
    """CUDA, torch builds with blockwise scaling: scale_a [M, K/128] (M-major), scale_b [N/128, K/128]."""
    return lambda: torch._scaled_mm(xq, wq.T, scale_a=xs.t().contiguous().t(), scale_b=ws.t(),
                                    out_dtype=torch.bfloat16)


def _te(x, w):
    import transformer_engine.pytorch as te
    from transformer_engine.common import recipe
    lin = te.Linear(w.shape[1], w.shape[0], bias=False, params_dtype=torch.bfloat16, device="cuda")
    with torch.no_grad():
        lin.weight.copy_(w)
    xb, rcp = x.bfloat16(), recipe.Float8BlockScaling()

    def fn():
        with te.fp8_autocast(enabled=True, fp8_recipe=rcp):
            return lin(xb)
    return fn


def providers(x, w, dev, want):
    xq, xs = quantize_act(x)
    wq, ws = quantize_weight(w)
    xb, wb = x.bfloat16(), w.bfloat16()
    make = {
        "kdarch": lambda: (lambda: fp8_gemm(xq, xs, wq, ws, torch.bfloat16)),
        "kdarch+quant": lambda: (lambda: fp8_gemm(*quantize_act(x), wq, ws, torch.bfloat16)),
        "torch_bf16": lambda: (lambda: xb @ wb.T),
        "torch_fp32": lambda: (lambda: x @ w.T),
        "scaled_mm_tensor": lambda: _scaled_mm_tensor(x, w),
        "scaled_mm_row": lambda: _scaled_mm_row(x, w),
        "scaled_mm_block": lambda: _scaled_mm_block(xq, xs, wq, ws),
        "te": lambda: _te(x, w),
    }
    for name in want:
        if name in ("scaled_mm_block", "te") and dev.type != "cuda":
            continue
        try:
            fn = make[name]()
            fn()
        except Exception as err:  # a peer this torch / GPU lacks: say so, keep going
            print(f"  skip {name}: {type(err).__name__}: {(str(err).splitlines() or [''])[0][:120]}")
            continue
        yield name, fn


def main(args):
    dev = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.set_num_threads(args.threads)
    if dev.type == "cuda":
        import triton.testing
        timer = lambda fn: [ms / 1e3 for ms in triton.testing.do_bench(fn, return_mode="all")]  # noqa: E731
    else:
        timer = lambda fn: time_cpu(fn, warmup=args.warmup, repeat=args.repeat)  # noqa: E731
    shapes = {"small": SMALL, "full": FULL, "all": SMALL + FULL}.get(args.shapes) or \
        [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    unit, scale = ("TFLOP/s", 1e12) if dev.type == "cuda" else ("GFLOP/s", 1e9)
    rows, lines = [], []
    for M, N, K in shapes:
        torch.manual_seed(0)
        x, w = torch.randn(M, K, device=dev), torch.randn(N, K, device=dev) / K ** 0.5
        want = x @ w.T
        flops, xname = 2 * M * N * K, f"{M}x{N}x{K}"
        cfg = dict(M=M, N=N, K=K, threads=args.threads, backend="auto")
        print(f"{xname}:")
        times = {}
        for name, fn in providers(x, w, dev, args.providers):
            err = rel_err(fn().float(), want)
            t = timer(fn)
            times[name] = sorted(t)[len(t) // 2]
            rows += [row("fp8_gemm", name, "fwd", "time", "ms", "MxNxK", xname, [v * 1e3 for v in t], cfg),
                     row("fp8_gemm", name, "fwd", "throughput", unit, "MxNxK", xname, [flops / v / scale for v in t],
                         cfg),
                     row("fp8_gemm", name, "fwd", "rel_err_vs_fp32", "ratio", "MxNxK", xname, err, cfg)]
            lines.append([xname, name, f"{times[name] * 1e3:.2f}", f"{flops / times[name] / scale:.1f}", "", "",
                          f"{err:.4f}"])
            print(f"  {name:17s} {times[name] * 1e3:9.2f} ms  {err:.4f}")
        for line in lines[-len(times):]:  # speed ratios vs the dense peers
            for col, peer in ((4, "torch_bf16"), (5, "torch_fp32")):
                if peer in times:
                    line[col] = f"{times[peer] / times[line[1]]:.2f}x"
                    rows.append(row("fp8_gemm", line[1], "fwd", f"speedup_vs_{peer}", "x", "MxNxK", xname,
                                    times[peer] / times[line[1]], cfg))
    print()
    print_table(["MxNxK", "provider", "ms p50", unit, "vs bf16", "vs fp32", "rel err vs fp32"], lines)
    print(f"\nCSV: {write_csv(args.out, rows)}")
    png = plot_metric(rows, [("fp8_gemm", "throughput"), ("fp8_gemm", "rel_err_vs_fp32")],
                      RESULTS_DIR / f"{args.out}.png", f"FP8 block-scaled GEMM vs dense, {dev.type}")
    if png:
        print(f"plot: {png}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="small", help="small | full | all | comma list of MxNxK")
    p.add_argument("--providers", nargs="+", default=["kdarch", "kdarch+quant", "torch_bf16", "torch_fp32",
                                                      "scaled_mm_tensor", "scaled_mm_row", "scaled_mm_block", "te"])
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default=None)
    p.add_argument("--out", default="fp8_gemm", help="CSV name under benchmarks/results/")
    main(p.parse_args())
