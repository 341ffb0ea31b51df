"""MoE expert dispatch: each kernel and the whole routed-expert layer, kdarch beside its baselines in one run.

    python benchmarks/moe_dispatch.py --quick          # CPU: 128 / 1024 / 4096 tokens, a few minutes
    python benchmarks/moe_dispatch.py                  # 128 ... 32k tokens (CPU: capped by --max-tokens)
    python benchmarks/moe_dispatch.py --configs E64-K6 --tokens 2048 --dtype bf16

Rows (DeepSeek-like shapes scaled down: H=512, I=256, E=16/K=4 and E=64/K=6, sigmoid router, 1 shared expert):
  kernels    metadata (counts/offsets/permutation), permute (gather rows into expert order), grouped GEMM
             (the gate/up projection [M, H] x [E, 2I, H]^T), combine (un-permute + weighted sum over K).
             torch = kdarch's torch building blocks (argsort/searchsorted, index_select, torch._grouped_mm,
             gather + fp32 sum); triton = kernels/moe_dispatch.py (the GEMM gathers rows in-kernel).
  moe_ffn    kdarch.ops.moe_ffn fwd and fwd+bwd: torch backend on torch._grouped_mm and on padded bmm, the fp32
             reference loop (kernels/moe_ref.py), triton; and "dense": a dense SwiGLU MLP on all M = T*K rows,
             i.e. a dense matmul chain of the same FLOPs (the ideal a dispatch layer approaches).
  moe_layer  router + routed experts + shared expert: kdarch.model.moe.MoE vs transformers' DeepseekV3MoE
             (its default eager expert loop, and its grouped_mm experts) with copied weights (outputs checked).
Triton runs only on CUDA: under the CPU interpreter it is a correctness tool, not a speed path.

Output: a table per section, a summary (moe_ffn GFLOP/s as a fraction of dense; kdarch layer speed over
transformers'), long-form CSV in benchmarks/results/moe_dispatch.csv and a plot (if matplotlib is installed).
Timing: CPU = median of --repeat calls after --warmup at fixed --threads, all providers of one point timed
round-robin (shared machines drift; use --threads 1 where other jobs run); CUDA = triton.testing.do_bench.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path
from unittest import mock

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS_DIR, print_table, row, time_cpu, write_csv  # noqa: E402

CONFIGS = {"E16-K4": dict(H=512, I=256, E=16, K=4), "E64-K6": dict(H=512, I=256, E=64, K=6),
           "V3-E32-K8": dict(H=7168, I=2048, E=32, K=8)}
"""V3-E32-K8: DeepSeek-V3's expert shape (hidden 7168, expert width 2048, top-8) with the 32 experts one GPU holds
under 8-way expert parallelism (GPU only: its weights alone are 2.8 GB in bf16)."""
DEFAULT_CONFIGS = ("E16-K4", "E64-K6")
TOKENS = (128, 512, 2048, 8192, 32768)
QUICK_TOKENS = (128, 1024, 4096)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def measure(tasks, args, dev):
    """{key: fn} -> {key: seconds per call}. On the CPU the tasks run round-robin (warm-up rounds, then timed
    rounds), so load from other processes drifts over all providers alike; on CUDA, do_bench per task."""
    if dev.type == "cuda":
        import triton.testing
        return {k: [ms / 1e3 for ms in triton.testing.do_bench(fn, return_mode="all")] for k, fn in tasks.items()}
    for _ in range(args.warmup):
        for fn in tasks.values():
            fn()
    out = {k: [] for k in tasks}
    for _ in range(args.repeat):
        for k, fn in tasks.items():
            out[k] += time_cpu(fn, warmup=0, repeat=1)
    return out


def task(fn, mode, leaves=(), grad=None, env=None):
    """A timed call: forward under no_grad, or forward + backward into `leaves`; optional env overrides."""
    def call():
        with mock.patch.dict(os.environ, env) if env else contextlib.nullcontext():
            if mode == "fwd":
                with torch.no_grad():
                    return fn()
            return torch.autograd.grad(fn(), leaves, grad)
    return call


def make_moe(cfg, dtype, dev, seed=0):
    """kdarch's MoE layer (router + routed + shared experts) and transformers' DeepseekV3MoE with the same weights."""
    import kdarch
    from kdarch.model.moe import MoE
    c = kdarch.get_preset("bench", hidden_size=cfg["H"], moe_intermediate_size=cfg["I"], n_routed_experts=cfg["E"],
                          num_experts_per_tok=cfg["K"], n_group=1, topk_group=1, n_shared_experts=1,
                          routed_scaling_factor=2.5, score_func="sigmoid", norm_topk_prob=True)
    torch.manual_seed(seed)
    moe = MoE(c)
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0.0, 0.02)
    moe = moe.to(dev, dtype).train()
    moe.gate.to(torch.float32)  # router in fp32, as in both models
    try:
        from transformers import DeepseekV3Config
        from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE
    except ImportError:
        return moe, None
    hc = DeepseekV3Config(hidden_size=cfg["H"], moe_intermediate_size=cfg["I"], n_routed_experts=cfg["E"],
                          num_experts_per_tok=cfg["K"], n_group=1, topk_group=1, n_shared_experts=1,
                          routed_scaling_factor=2.5, norm_topk_prob=True, hidden_act="silu")
    hc._experts_implementation = "eager"
    hf = DeepseekV3MoE(hc).to(dev, dtype).train()
    gate, up = moe.shared.w_gate_up.weight.chunk(2, dim=0)
    with torch.no_grad():
        for dst, src in ((hf.gate.weight, moe.gate.weight), (hf.gate.e_score_correction_bias, moe.gate.bias),
                         (hf.experts.gate_up_proj, moe.w_gate_up), (hf.experts.down_proj, moe.w_down),
                         (hf.shared_experts.gate_proj.weight, gate), (hf.shared_experts.up_proj.weight, up),
                         (hf.shared_experts.down_proj.weight, moe.shared.w_down.weight)):
            dst.copy_(src)
    hf.gate.to(torch.float32)
    return moe, hf


def hf_call(hf, experts_implementation, x):
    hf.config._experts_implementation = experts_implementation  # what from_pretrained(experts_implementation=) sets
    return hf(x)


def bench_point(name, cfg, T, dtype, dev, args, results):
    """All sections for one (config, token count); appends CSV rows to `results`."""
    from kdarch.kernels.moe_ref import moe_ffn_ref
    from kdarch.ops import moe_ffn
    from kdarch.ops.moe import routing_metadata
    from kdarch.ops.moe.torch_backend import grouped_mm_ok, moe_ffn_torch
    H, I, E, K = cfg["H"], cfg["I"], cfg["E"], cfg["K"]
    M = T * K
    gen = torch.Generator(device=dev).manual_seed(T)
    x = torch.randn(T, H, device=dev, generator=gen).to(dtype)
    ids = torch.rand(T, E, device=dev, generator=gen).topk(K, dim=-1).indices
    w = torch.rand(T, K, device=dev, generator=gen)
    wgu = (torch.randn(E, 2 * I, H, device=dev, generator=gen) / H**0.5).to(dtype)
    wd = (torch.randn(E, H, I, device=dev, generator=gen) / I**0.5).to(dtype)
    conf = dict(config=name, H=H, I=I, E=E, K=K, dtype=str(dtype).split(".")[-1])
    flops = {"moe_ffn": 6 * M * H * I, "grouped_gemm": 2 * M * H * 2 * I,
             "moe_layer": 6 * M * H * I + 6 * T * H * I + 2 * T * H * E}
    cuda = dev.type == "cuda"

    tasks = {}  # (kernel, provider, mode) -> call

    # kernels
    _, offsets, sorted_idx, inv = routing_metadata(ids, E)
    x_MH = x[sorted_idx // K]
    ends = offsets[1:].to(torch.int32)
    y_MH = torch.randn(M, H, device=dev, generator=gen).to(dtype)
    kernels = {("metadata", "torch"): lambda: routing_metadata(ids, E),
               ("permute", "torch"): lambda: x.index_select(0, sorted_idx // K),
               ("grouped_gemm", "dense"): lambda: x_MH @ wgu[0].T,
               ("combine", "torch"): lambda: (y_MH[inv].view(T, K, H).float() * w[..., None]).sum(1).to(dtype)}
    if grouped_mm_ok(dtype, wgu):
        kernels["grouped_gemm", "torch._grouped_mm"] = lambda: torch._grouped_mm(x_MH, wgu.transpose(-1, -2), offs=ends)
    if cuda:
        from kdarch.kernels import moe_dispatch as md
        kernels.update({("metadata", "triton"): lambda: md.routing_metadata(ids, E),
                        ("permute", "triton"): lambda: md.permute(x, sorted_idx, K),
                        ("grouped_gemm", "triton"): lambda: md.grouped_gemm(x, wgu, offsets, sorted_idx, K),
                        ("combine", "triton"): lambda: md.combine(y_MH, inv, K, w, out_dtype=dtype)})
    tasks.update({(k, p, "fwd"): task(fn, "fwd") for (k, p), fn in kernels.items()})

    # moe_ffn: the routed experts alone, and a dense SwiGLU MLP of the same FLOPs on all M rows
    leaves = [t.clone().requires_grad_() for t in (x, w, wgu, wd)]
    grad = torch.randn(T, H, device=dev, generator=gen).to(dtype)
    providers = {"torch:padded_bmm": lambda *a: moe_ffn_torch(*a, impl="padded_bmm")}
    if grouped_mm_ok(dtype, wgu, wd):
        providers["torch:grouped_mm"] = lambda *a: moe_ffn_torch(*a, impl="grouped_mm")
    if cuda:
        providers["triton"] = lambda *a: moe_ffn(*a, backend="triton")
    if T <= args.ref_max_tokens:
        providers["torch-ref"] = moe_ffn_ref
    dense_leaves = [t.detach().clone().requires_grad_() for t in (x_MH, wgu[0], wd[0])]

    def dense():
        gate, up = F.linear(dense_leaves[0], dense_leaves[1]).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, dense_leaves[2])

    g_dense = torch.randn(M, H, device=dev, generator=gen).to(dtype)
    for mode in ("fwd", "fwd+bwd"):
        for prov, fn in providers.items():
            tasks["moe_ffn", prov, mode] = task(lambda fn=fn: fn(leaves[0], ids, *leaves[1:]), mode, leaves, grad)
        tasks["moe_ffn", "dense", mode] = task(dense, mode, dense_leaves, g_dense)

    # the whole MoE layer vs transformers
    moe, hf = make_moe(cfg, dtype, dev)
    x_layer = x.view(1, T, H).clone().requires_grad_()
    layers = {"kdarch": (lambda: moe(x_layer)[0], moe, "torch")}
    if cuda:
        layers["kdarch-triton"] = (lambda: moe(x_layer)[0], moe, "triton")
    if hf is not None:
        with torch.no_grad():
            diff = (moe(x_layer)[0].float() - hf(x_layer).float()).abs().max().item()
        print(f"  [{name} T={T}] kdarch MoE vs transformers DeepseekV3MoE: max |diff| = {diff:.2e}")
        for impl in ("eager", "grouped_mm"):
            layers[f"hf-{impl}"] = (lambda impl=impl: hf_call(hf, impl, x_layer), hf, None)
    for mode in ("fwd", "fwd+bwd"):
        for prov, (fn, module, backend) in layers.items():
            ps = [x_layer, *(p for p in module.parameters() if p.requires_grad)]
            tasks["moe_layer", prov, mode] = task(fn, mode, ps, grad.view(1, T, H),
                                                  env={"KDARCH_BACKEND": backend} if backend else None)

    for (kernel, prov, mode), samples in measure(tasks, args, dev).items():
        results.append(row(kernel, prov, mode, "time", "ms", "tokens", T, [t * 1e3 for t in samples], conf))
        if kernel in flops:
            mult = 3 if mode == "fwd+bwd" else 1
            results.append(row(kernel, prov, mode, "throughput", "GFLOP/s", "tokens", T,
                               [mult * flops[kernel] / t / 1e9 for t in samples], conf))
        if cuda and mode == "fwd+bwd":
            torch.cuda.reset_peak_memory_stats()
            tasks[kernel, prov, mode]()
            results.append(row(kernel, prov, mode, "peak_memory", "MiB", "tokens", T,
                               torch.cuda.max_memory_allocated() / 2**20, conf))


def p50(results, **key):
    for r in results:
        if all(str(r[k]) == str(v) for k, v in key.items()):
            return r["p50"]
    return None


def report(results, cuda):
    """Per-section tables, then the summary against the targets."""
    kdarch_ffn = "triton" if cuda else "torch:grouped_mm"
    for kernel in ("metadata", "permute", "grouped_gemm", "combine", "moe_ffn", "moe_layer"):
        lines = []
        for r in results:
            if r["kernel"] == kernel and r["metric"] == "time":
                gf = p50(results, kernel=kernel, provider=r["provider"], mode=r["mode"], metric="throughput",
                         x_value=r["x_value"], config=r["config"])
                lines.append([r["config"].split('"config": "')[1].split('"')[0], r["x_value"], r["mode"], r["provider"],
                              f"{r['p50']:.3f}", f"{r['p20']:.3f}-{r['p80']:.3f}", f"{gf:.1f}" if gf else ""])
        if lines:
            print(f"\n== {kernel}")
            print_table(["config", "tokens", "mode", "provider", "ms p50", "ms p20-p80", "GFLOP/s"], lines)
    lines = []
    for r in results:
        if r["kernel"] != "moe_layer" or r["provider"] != "kdarch" or r["metric"] != "time":
            continue
        key = dict(config=r["config"], x_value=r["x_value"], mode=r["mode"])
        ffn = p50(results, kernel="moe_ffn", provider=kdarch_ffn, metric="throughput", **key)
        dense = p50(results, kernel="moe_ffn", provider="dense", metric="throughput", **key)
        hf_eager = p50(results, kernel="moe_layer", provider="hf-eager", metric="time", **key)
        hf_gmm = p50(results, kernel="moe_layer", provider="hf-grouped_mm", metric="time", **key)
        mine = p50(results, kernel="moe_layer", provider="kdarch-triton" if cuda else "kdarch", metric="time", **key)
        fmt = lambda v: f"{v:.2f}" if v else "n/a"  # noqa: E731
        lines.append([r["config"].split('"config": "')[1].split('"')[0], r["x_value"], r["mode"], fmt(ffn), fmt(dense),
                      fmt(ffn / dense if ffn and dense else None), fmt(mine), fmt(hf_eager),
                      fmt(hf_eager / mine if hf_eager else None), fmt(hf_gmm / mine if hf_gmm else None)])
    print(f"\n== summary (kdarch moe_ffn = {kdarch_ffn}; targets: fraction of dense >= 0.6, speed-up vs "
          "transformers >= 1.3x)")
    print_table(["config", "tokens", "mode", "moe_ffn GFLOP/s", "dense GFLOP/s", "fraction", "layer ms",
                 "hf-eager ms", "x hf-eager", "x hf-grouped_mm"], lines)


def plot(results, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("\nmatplotlib is not installed: skipping the plot (pip install matplotlib)")
        return
    configs = sorted({r["config"] for r in results})
    fig, axes = plt.subplots(2, len(configs), figsize=(6 * len(configs), 8), squeeze=False)
    for col, conf in enumerate(configs):
        for row_i, (kernel, metric) in enumerate((("moe_ffn", "throughput"), ("moe_layer", "time"))):
            ax = axes[row_i][col]
            for prov, mode in sorted({(r["provider"], r["mode"]) for r in results if r["kernel"] == kernel}):
                pts = sorted((r["x_value"], r["p50"]) for r in results if r["config"] == conf and r["kernel"] == kernel
                             and r["provider"] == prov and r["mode"] == mode and r["metric"] == metric)
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=f"{prov} {mode}")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("tokens")
            ax.set_ylabel("GFLOP/s" if metric == "throughput" else "ms")
            ax.set_title(f"{kernel} {conf}", fontsize=8)
            ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"\nplot: {path}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help=f"tokens {QUICK_TOKENS}, warmup 1, repeat 3")
    p.add_argument("--tokens", type=int, nargs="+", help=f"token counts (default {TOKENS})")
    p.add_argument("--configs", nargs="+", choices=sorted(CONFIGS), default=list(DEFAULT_CONFIGS))
    p.add_argument("--dtype", choices=sorted(DTYPES), help="default: fp32 on the CPU, bf16 on CUDA")
    p.add_argument("--max-tokens", type=int, default=8192, help="CPU only: skip larger token counts")
    p.add_argument("--ref-max-tokens", type=int, default=4096, help="run the fp32 reference loop up to this many")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--out", default="moe_dispatch", help="CSV (and plot) name under benchmarks/results/")
    args = p.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.quick:
        args.warmup, args.repeat = 1, 3
    tokens = args.tokens or (QUICK_TOKENS if args.quick else TOKENS)
    if dev.type == "cpu":
        tokens = [t for t in tokens if t <= args.max_tokens]
    dtype = DTYPES[args.dtype or ("bf16" if dev.type == "cuda" else "fp32")]
    torch.set_num_threads(args.threads)
    print(f"device {dev}, dtype {dtype}, threads {torch.get_num_threads()}, tokens {list(tokens)}")
    results = []
    for name in args.configs:
        for T in tokens:
            bench_point(name, CONFIGS[name], T, dtype, dev, args, results)
    report(results, dev.type == "cuda")
    print(f"\nCSV: {write_csv(args.out, results)}")
    plot(results, RESULTS_DIR / f"{args.out}.png")


if __name__ == "__main__":
    main()
