"""One training step (forward + backward + AdamW) of kdarch vs transformers' DeepseekV3ForCausalLM.

Both models get the same config and the same weights (kdarch's, exported through the Hugging Face
converter) and the same batch; each runs in its own subprocess so peak memory is measured cleanly.

    python benchmarks/e2e_train.py                  # bench preset, batch 8 x 256, fp32, 2 threads
    python benchmarks/e2e_train.py --steps 3 --batch 2 --seq 64   # quick look

transformers runs twice: with its default expert kernel (torch._grouped_mm) and with its eager
per-expert loop. Reports tokens/s and peak memory and their ratios (kdarch / transformers), the first-step
loss of each (they must agree), a table on stdout and a CSV in benchmarks/results/e2e_train.csv.
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
from common import peak_rss_mb, print_table, row, rss_mb, time_cpu, write_csv  # noqa: E402

GEMM_OPS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::addbmm", "aten::_grouped_mm"}
ROUTING_OPS = {"aten::index", "aten::index_select", "aten::gather", "aten::scatter", "aten::scatter_",
               "aten::scatter_add", "aten::scatter_add_", "aten::sort", "aten::argsort", "aten::topk", "aten::cumsum",
               "aten::bincount", "aten::histc", "aten::searchsorted", "aten::index_add", "aten::index_add_",
               "aten::index_put_", "aten::_index_put_impl_", "aten::nonzero", "aten::masked_select",
               "aten::repeat_interleave"}
SPLIT = ("gemm", "attention", "moe routing", "elementwise + copies", "optimizer")


def op_category(name: str) -> str:
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
        if e.key.startswith(("aten::", "kdarch::")):
            split[op_category(e.key)] += e.self_cpu_time_total / 1e6
    measured = sum(v for k, v in split.items() if k != "optimizer")
    for k in SPLIT[:-1]:
        split[k] *= wall / max(measured, 1e-9)
    return split


def worker(args) -> None:
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.worker == "kdarch":
        import kdarch
        model = kdarch.from_pretrained(Path(args.dir) / "kdarch")
    else:
        from transformers import AutoModelForCausalLM
        experts = {"hf": {}, "hf-eager": {"experts_implementation": "eager"}}[args.worker]
        model = AutoModelForCausalLM.from_pretrained(Path(args.dir) / "hf", attn_implementation=args.hf_attn,
                                                     dtype=torch.float32, **experts)
    model.train()
    ids = load_file(str(Path(args.dir) / "batch.safetensors"))["ids"]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    losses = []

    def fwd_bwd():
        out = model(input_ids=ids, labels=ids)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        losses.append(out.loss.item())

    def step():
        fwd_bwd()
        opt.step()

    base = rss_mb()
    times = time_cpu(step, warmup=args.warmup, repeat=args.steps)
    peak = peak_rss_mb() - base
    print(json.dumps({"times": times, "first_loss": losses[0], "peak_mb": peak, "split": profile_split(fwd_bwd, opt),
                      "params": sum(p.numel() for p in model.parameters())}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="bench")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=5, help="timed steps")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--hf-attn", default="sdpa", choices=["sdpa", "eager"], help="transformers attention kernel")
    p.add_argument("--worker", choices=["kdarch", "hf", "hf-eager"], help=argparse.SUPPRESS)
    p.add_argument("--dir", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)

    import kdarch
    cfg = kdarch.get_preset(args.preset)
    torch.manual_seed(0)
    model = kdarch.CausalLM(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        kdarch.save_pretrained(model, Path(tmp) / "kdarch")
        kdarch.save_pretrained(model, Path(tmp) / "hf", format="hf")
        batch = {"ids": torch.randint(0, cfg.vocab_size, (args.batch, args.seq))}
        save_file(batch, str(Path(tmp) / "batch.safetensors"))
        del model
        results = {}
        for provider in ("kdarch", "hf", "hf-eager"):
            cmd = [sys.executable, __file__, "--worker", provider, "--dir", tmp, "--threads", str(args.threads),
                   "--steps", str(args.steps), "--warmup", str(args.warmup), "--hf-attn", args.hf_attn]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True)
            results[provider] = json.loads(out.stdout.strip().splitlines()[-1])

    tokens = args.batch * args.seq
    setup = {"preset": args.preset, "batch": args.batch, "seq": args.seq, "threads": args.threads,
             "dtype": "float32", "hf_attn": args.hf_attn}
    rows, lines = [], []
    for provider, r in results.items():
        tps = [tokens / t for t in r["times"]]
        rows += [row("train_step", provider, "fwd+bwd+adamw", "tokens_per_s", "tok/s", "tokens", tokens, tps, setup),
                 row("train_step", provider, "fwd+bwd+adamw", "step_time", "s", "tokens", tokens, r["times"], setup),
                 row("train_step", provider, "fwd+bwd+adamw", "peak_memory", "MiB", "tokens", tokens, r["peak_mb"],
                     setup)]
        r["tps"] = sorted(tps)[len(tps) // 2]
        lines.append([provider, f"{r['params'] / 1e6:.1f}M", f"{r['tps']:.0f}", f"{r['peak_mb']:.0f}",
                      f"{r['first_loss']:.5f}"])
    print(f"one training step, preset {args.preset!r}, batch {args.batch} x {args.seq}, fp32, {args.threads} threads")
    print_table(["provider", "params", "tokens/s", "peak MiB", "first loss"], lines)
    print()
    for peer, what in (("hf", "transformers (default experts: grouped_mm)"),
                       ("hf-eager", "transformers (eager experts loop)")):
        speed = results["kdarch"]["tps"] / results[peer]["tps"]
        mem = results["kdarch"]["peak_mb"] / results[peer]["peak_mb"]
        rows += [row("train_step", f"kdarch/{peer}", "fwd+bwd+adamw", metric, "x", "tokens", tokens, value, setup)
                 for metric, value in (("speed_ratio", speed), ("memory_ratio", mem))]
        print(f"kdarch / {what}: {speed:.2f}x tokens/s (target >= 1.5x), {mem:.2f}x peak memory (target <= 0.8x)")
    print("\nwhere a step's time goes (profiled forward + backward, operators' own time; AdamW timed alone):")
    split_lines = []
    for provider, r in results.items():
        total = sum(r["split"].values())
        split_lines.append([provider] + [f"{r['split'][k]:.2f} s ({r['split'][k] / total:.0%})" for k in SPLIT])
        rows += [row("train_step", provider, "fwd+bwd+adamw", f"time_{k.replace(' ', '_')}", "s", "tokens", tokens,
                     r["split"][k], setup) for k in SPLIT]
    print_table(["provider", *SPLIT], split_lines)
    loss_gap = max(abs(results["kdarch"]["first_loss"] - results[p]["first_loss"]) for p in ("hf", "hf-eager"))
    print(f"first-step loss difference: {loss_gap:.2e} (same weights, same batch)")
    print(f"CSV: {write_csv('e2e_train', rows)}")


if __name__ == "__main__":
    main()
