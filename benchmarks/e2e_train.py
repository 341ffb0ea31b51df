"""One training step (forward + backward + AdamW) of kdarch vs transformers' DeepseekV3ForCausalLM.

Both models get the same config and the same weights (kdarch's, exported through the Hugging Face
converter) and the same batch; each runs in its own subprocess so peak memory is measured cleanly.

    python benchmarks/e2e_train.py                  # bench preset, batch 8 x 256, fp32, 2 threads, 2 rounds
    python benchmarks/e2e_train.py --compile        # also both with regional torch.compile (minutes more)
    python benchmarks/e2e_train.py --steps 3 --batch 2 --seq 64 --rounds 1   # quick look
    python benchmarks/e2e_train.py --publish        # also the CSV and plot in benchmarks/measured/

Each side steps as its training loop does: forward with labels, backward, AdamW, zero_grad(set_to_none);
kdarch's forward skips the logits (`return_logits=False`, what `kdarch train` calls; its fused head never
builds [B*T, V] logits), transformers' returns them (it has no such switch). transformers runs with its
default expert kernel (torch._grouped_mm) and with its eager per-expert loop; with --compile each side also
runs with every decoder block compiled (kdarch: `train.compile`'s compile_blocks; transformers: the same on
its layers). The providers take turns, `--rounds` times; each provider's figure is its best round (the
median step of that round): on a shared machine the best round is the one the other jobs disturbed least.
Reports tokens/s and peak memory and their ratios (kdarch / transformers), the first-step loss of each (they
must agree), where a step's time goes (GEMM / attention / MoE routing / elementwise / optimizer, from the
profiler), a table on stdout, a CSV in benchmarks/results/e2e_train.csv and a plot beside it.
Peak memory is the process's resident-set high-water mark during the steps minus its size before them
(weights loaded): activations, gradients, optimizer state and allocator slack.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    MEASURED_DIR,
    RESULTS_DIR,
    cpu_model,
    peak_rss_mb,
    print_table,
    row,
    rss_mb,
    time_cpu,
    write_csv,
)

GEMM_OPS = {"aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm", "aten::baddbmm_",
            "aten::addbmm", "aten::addbmm_", "aten::_grouped_mm"}
TARGET_SPEED, TARGET_MEMORY = 1.4, 0.7
PROVIDERS = ("kdarch", "hf", "hf-eager")
COMPILED = ("kdarch-compile", "hf-compile")
ROUTING_OPS = {"aten::index", "aten::index_select", "aten::gather", "aten::scatter", "aten::scatter_",
               "aten::scatter_add", "aten::scatter_add_", "aten::sort", "aten::argsort", "aten::topk", "aten::cumsum",
               "aten::bincount", "aten::histc", "aten::searchsorted", "aten::index_add", "aten::index_add_",
               "aten::index_put_", "aten::_index_put_impl_", "aten::nonzero", "aten::masked_select",
               "aten::repeat_interleave"}
SPLIT = ("gemm", "attention", "moe routing", "elementwise + copies", "optimizer")


def op_category(name: str) -> str:
    if name.startswith("kdarch_C::moe_"):
        return "moe routing"
    if name in GEMM_OPS:
        return "gemm"
    if "scaled_dot_product" in name or "softmax" in name:
        return "attention"
    return "moe routing" if name in ROUTING_OPS else "elementwise + copies"


def profile_split(step_fwd_bwd, optimizer) -> dict[str, float]:
    """Seconds of one step by kind of work: the forward + backward under the profiler, each operator's own time
    by category (scaled to the step's wall time, which the profiler's overhead inflates), and AdamW timed alone."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        step_fwd_bwd()
        wall = time.perf_counter() - t0
    t0 = time.perf_counter()
    optimizer.step()
    split = dict.fromkeys(SPLIT, 0.0)
    split["optimizer"] = time.perf_counter() - t0
    for e in prof.key_averages():
        if e.key.startswith(("aten::", "kdarch::", "kdarch_C::", "cpp_fused", "graph_")):  # last two: compiled kernels
            split[op_category(e.key)] += e.self_cpu_time_total / 1e6
    measured = sum(v for k, v in split.items() if k != "optimizer")
    for k in SPLIT[:-1]:
        split[k] *= wall / max(measured, 1e-9)
    return split


def worker(args) -> None:
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    compiled = args.worker.endswith("-compile")
    if args.worker.startswith("kdarch"):
        import kdarch
        from kdarch.train.loop import compile_blocks
        model = kdarch.from_pretrained(Path(args.dir) / "kdarch")
        if compiled:
            compile_blocks(model)
        extra = {"return_logits": False}
    else:
        from transformers import AutoModelForCausalLM
        experts = {"hf-eager": {"experts_implementation": "eager"}}.get(args.worker, {})
        model = AutoModelForCausalLM.from_pretrained(Path(args.dir) / "hf", attn_implementation=args.hf_attn,
                                                     dtype=torch.float32, **experts)
        if compiled:
            for layer in model.model.layers:
                layer.compile(dynamic=False)
        extra = {}
    model.train()
    ids = load_file(str(Path(args.dir) / "batch.safetensors"))["ids"]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    losses = []

    def fwd_bwd():
        out = model(input_ids=ids, labels=ids, **extra)
        out.loss.backward()
        losses.append(out.loss.item())

    def step():
        fwd_bwd()
        opt.step()
        opt.zero_grad(set_to_none=True)

    base = rss_mb()
    times = time_cpu(step, warmup=args.warmup, repeat=args.steps)
    peak = peak_rss_mb() - base
    split = profile_split(fwd_bwd, opt)
    print(json.dumps({"times": times, "first_loss": losses[0], "peak_mb": peak, "split": split,
                      "params": sum(p.numel() for p in model.parameters())}))


def best_round(rounds: list[dict]) -> dict:
    """The round whose median step was fastest, with every round's median kept for the CSV."""
    med = [sorted(r["times"])[len(r["times"]) // 2] for r in rounds]
    best = dict(rounds[med.index(min(med))])
    best["round_medians"] = med
    best["peak_mb"] = min(r["peak_mb"] for r in rounds)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="bench")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=5, help="timed steps per round")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2, help="the providers take turns this many times")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--hf-attn", default="sdpa", choices=["sdpa", "eager"], help="transformers attention kernel")
    p.add_argument("--compile", action="store_true", help="also both sides with their decoder blocks compiled")
    p.add_argument("--publish", action="store_true", help="also write the CSV and plot to benchmarks/measured/")
    p.add_argument("--worker", choices=PROVIDERS + COMPILED, help=argparse.SUPPRESS)
    p.add_argument("--dir", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)

    import kdarch
    cfg = kdarch.get_preset(args.preset)
    torch.manual_seed(0)
    model = kdarch.CausalLM(cfg)
    providers = PROVIDERS + (COMPILED if args.compile else ())
    with tempfile.TemporaryDirectory() as tmp:
        kdarch.save_pretrained(model, Path(tmp) / "kdarch")
        kdarch.save_pretrained(model, Path(tmp) / "hf", format="hf")
        batch = {"ids": torch.randint(0, cfg.vocab_size, (args.batch, args.seq))}
        save_file(batch, str(Path(tmp) / "batch.safetensors"))
        del model
        runs = {provider: [] for provider in providers}
        for _ in range(args.rounds):
            for provider in providers:
                cmd = [sys.executable, __file__, "--worker", provider, "--dir", tmp, "--threads", str(args.threads),
                       "--steps", str(args.steps), "--warmup", str(args.warmup), "--hf-attn", args.hf_attn]
                out = subprocess.run(cmd, check=True, capture_output=True, text=True)
                runs[provider].append(json.loads(out.stdout.strip().splitlines()[-1]))
    results = {provider: best_round(r) for provider, r in runs.items()}

    tokens = args.batch * args.seq
    machine = cpu_model()
    setup = {"preset": args.preset, "batch": args.batch, "seq": args.seq, "threads": args.threads,
             "dtype": "float32", "hf_attn": args.hf_attn, "rounds": args.rounds, "cpu": machine}
    rows, lines = [], []
    for provider, r in results.items():
        tps = [tokens / t for t in r["times"]]
        rows += [row("train_step", provider, "fwd+bwd+adamw", "tokens_per_s", "tok/s", "tokens", tokens, tps, setup),
                 row("train_step", provider, "fwd+bwd+adamw", "step_time", "s", "tokens", tokens, r["times"], setup),
                 row("train_step", provider, "fwd+bwd+adamw", "round_median_step_time", "s", "tokens", tokens,
                     r["round_medians"], setup),
                 row("train_step", provider, "fwd+bwd+adamw", "peak_memory", "MiB", "tokens", tokens, r["peak_mb"],
                     setup)]
        r["tps"] = tokens / min(r["round_medians"])  # the best round's median step
        lines.append([provider, f"{r['params'] / 1e6:.1f}M", f"{r['tps']:.0f}", f"{r['peak_mb']:.0f}",
                      f"{r['first_loss']:.5f}", " ".join(f"{tokens / t:.0f}" for t in r["round_medians"])])
    print(f"one training step, preset {args.preset!r}, batch {args.batch} x {args.seq}, fp32, {args.threads} threads, "
          f"best of {args.rounds} rounds; {machine}")
    print_table(["provider", "params", "tokens/s", "peak MiB", "first loss", "tokens/s per round"], lines)
    print()
    pairs = [("kdarch", "hf", "transformers (default experts: grouped_mm)"),
             ("kdarch", "hf-eager", "transformers (eager experts loop)")]
    if args.compile:
        pairs += [("kdarch-compile", "hf-compile", "transformers, both compiled"),
                  ("kdarch-compile", "hf", "transformers (grouped_mm), only kdarch compiled")]
    for ours, peer, what in pairs:
        speed = results[ours]["tps"] / results[peer]["tps"]
        mem = results[ours]["peak_mb"] / results[peer]["peak_mb"]
        rows += [row("train_step", f"{ours}/{peer}", "fwd+bwd+adamw", metric, "x", "tokens", tokens, value, setup)
                 for metric, value in (("speed_ratio", speed), ("memory_ratio", mem))]
        print(f"{ours} / {what}: {speed:.2f}x tokens/s (target >= {TARGET_SPEED}x), {mem:.2f}x peak memory "
              f"(target <= {TARGET_MEMORY}x)")
    print("\nwhere a step's time goes (profiled forward + backward, operators' own time; AdamW timed alone):")
    split_lines = []
    for provider, r in results.items():
        total = sum(r["split"].values())
        split_lines.append([provider] + [f"{r['split'][k]:.2f} s ({r['split'][k] / total:.0%})" for k in SPLIT])
        rows += [row("train_step", provider, "fwd+bwd+adamw", f"time_{k.replace(' ', '_')}", "s", "tokens", tokens,
                     r["split"][k], setup) for k in SPLIT]
    print_table(["provider", *SPLIT], split_lines)
    loss_gap = max(abs(results["kdarch"]["first_loss"] - r["first_loss"]) for r in results.values())
    print(f"largest first-step loss difference: {loss_gap:.2e} (same weights, same batch)")
    csv_path = write_csv("e2e_train", rows)
    png = plot(results, tokens, machine, RESULTS_DIR / "e2e_train.png")
    print(f"CSV: {csv_path}" + (f", plot: {png}" if png else ""))
    if args.publish:
        write_csv("e2e_train", rows, MEASURED_DIR)
        plot(results, tokens, machine, MEASURED_DIR / "e2e_train.png")
        print(f"published to {MEASURED_DIR}")


def plot(results: dict, tokens: int, machine: str, path: Path) -> Path | None:
    """tokens/s per provider beside each step's split into kinds of work (stacked seconds)."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)[::-1]
    fig, (ax_speed, ax_split) = plt.subplots(1, 2, figsize=(11, 0.5 * len(names) + 1.8), sharey=True)
    ax_speed.barh(names, [results[n]["tps"] for n in names], color="#1f9e74")
    ax_speed.set(xlabel="tokens/s (higher is better)")
    left = [0.0] * len(names)
    for kind, color in zip(SPLIT, ("#3b6fb6", "#e0a030", "#8c5fb0", "#c04848", "#7a7a7a")):
        widths = [results[n]["split"][kind] for n in names]
        ax_split.barh(names, widths, left=left, color=color, label=kind)
        left = [a + b for a, b in zip(left, widths)]
    ax_split.set(xlabel="seconds per step, by kind of work")
    ax_split.legend(fontsize=7, loc="lower right")
    for ax in (ax_speed, ax_split):
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle(f"One training step, {tokens} tokens, fp32 ({machine})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


if __name__ == "__main__":
    main()
