"""The GPU validation suite in one command: the CUDA tests, then each benchmark's GPU configuration.

    python benchmarks/gpu_suite.py                  # one CUDA GPU: under 8 minutes on an H200
    python benchmarks/gpu_suite.py --device cpu     # the same steps on the CPU at small sizes (checks the suite)
    python benchmarks/gpu_suite.py --steps tests fp8_gemm

Steps, each in a subprocess with its own time limit (a failure or a timeout is reported; the rest still run):
  tests         pytest tests/gpu: every kernel on the device against its reference (see tests/gpu/conftest.py)
  fp8_gemm      benchmarks/fp8_gemm.py at DeepSeek-V3's shapes: kdarch vs torch bf16, torch._scaled_mm, TE
  moe_dispatch  benchmarks/moe_dispatch.py at DeepSeek-V3's expert shape (V3-E32-K8) in bf16: the grouped GEMM
                vs a dense matmul of the same FLOPs and torch._grouped_mm; the MoE layer vs transformers'
  distill_head  benchmarks/distill_head.py at N 8192 x d 4096 x V 128k in bf16: fused head vs full logits
  train_step    one training step (forward, backward, AdamW) of the bench preset under bf16 autocast with each
                backend: torch, triton, triton + FP8, triton + compiled blocks
Output in benchmarks/results/gpu_suite/ (or --results-dir): each step's CSV and log, gpu_suite.csv (the targets
in the benchmarks' long form) and summary.md, one screen: device, test counts and failures, each target with
its measured value and whether it is met.
Targets: FP8 GEMM >= 1.5x torch bf16 at 4096x7168x16384 and >= 60% of the 1979 TFLOP/s dense FP8 peak of an
H200; MoE grouped GEMM >= 70% of a dense bf16 matmul's throughput; fused head <= 0.25x the memory of full
logits at <= 1.0x the time. Without CUDA (and without --device cpu) it says so and exits with status 2.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from common import print_table, row, time_cpu, write_csv  # noqa: E402

STEPS = ("tests", "fp8_gemm", "moe_dispatch", "distill_head", "train_step")
LIMITS = {"tests": 210, "fp8_gemm": 60, "moe_dispatch": 90, "distill_head": 40, "train_step": 80}
"""Seconds per step: 8 minutes in all at worst (--limit-scale stretches them, e.g. on a smaller GPU)."""
FP8_PEAK_TFLOPS = 1979.0  # H200 dense FP8
FP8_TARGET_SHAPE = "4096x7168x16384"


def step_args(device: str) -> dict[str, list[str]]:
    """Each benchmark's command-line for this device: the GPU configuration, or a small stand-in on the CPU."""
    if device == "cuda":
        return {"fp8_gemm": ["--shapes", "full", "--providers", "kdarch", "kdarch+quant", "torch_bf16",
                             "scaled_mm_tensor", "scaled_mm_row", "scaled_mm_block", "te"],
                "moe_dispatch": ["--configs", "V3-E32-K8", "--tokens", "4096", "16384", "--dtype", "bf16",
                                 "--ref-max-tokens", "0"],
                "distill_head": ["--device", "cuda", "--dtype", "bfloat16", "--tokens", "8192", "--hidden", "4096",
                                 "--vocab", "131072", "--rounds", "1", "--repeat", "5", "--warmup", "2"],
                "train_step": ["--preset", "bench", "--batch", "16", "--seq", "1024",
                               "--variants", "torch", "triton", "triton+fp8", "triton+compile"]}
    return {"fp8_gemm": ["--shapes", "256x512x384", "--providers", "kdarch", "torch_bf16", "torch_fp32",
                         "--repeat", "2", "--warmup", "1"],
            "moe_dispatch": ["--configs", "E16-K4", "--tokens", "128", "--quick", "--ref-max-tokens", "0"],
            "distill_head": ["--device", "cpu", "--tokens", "512", "--hidden", "64", "--vocab", "4096",
                             "--rounds", "1", "--repeat", "2"],
            "train_step": ["--preset", "debug", "--batch", "2", "--seq", "32", "--variants", "torch", "torch+fp8"]}


# ---- the train-step benchmark (run in its own process per variant) -----------------------------------------------

def train_step_worker(args) -> None:
    """One variant, "<backend>[+fp8][+compile]": step times, first-step time (compilation included), peak memory."""
    import kdarch
    from kdarch.train.loop import compile_blocks
    backend, *flags = args.worker_variant.split("+")
    os.environ["KDARCH_BACKEND"] = backend
    dev = torch.device(args.device)
    cfg = kdarch.get_preset(args.preset, fp8="fp8" in flags)
    torch.manual_seed(0)
    model = kdarch.CausalLM(cfg).to(dev).train()
    if "compile" in flags:
        compile_blocks(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), generator=torch.Generator().manual_seed(1)).to(dev)
    losses = []

    def step():
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            loss = model(ids, labels=ids, return_logits=False).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())  # a read: the step is timed to its end

    first = time_cpu(step, warmup=0, repeat=1)[0]
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    times = time_cpu(step, warmup=1, repeat=args.repeat)
    peak = torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda" else float("nan")
    print(json.dumps({"times": times, "first_step_s": first, "first_loss": losses[0], "peak_mb": peak,
                      "params": cfg.num_params()}))


def train_step_bench(args) -> None:
    rows, lines, tokens = [], [], args.batch * args.seq
    setup = {"preset": args.preset, "batch": args.batch, "seq": args.seq, "dtype": "bf16 autocast"}
    for variant in args.variants:
        cmd = [sys.executable, __file__, "--worker-variant", variant, "--device", args.device, "--preset", args.preset,
               "--batch", str(args.batch), "--seq", str(args.seq), "--repeat", str(args.repeat)]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            print(f"  {variant} failed (rc {out.returncode}): {out.stderr.strip()[-400:]}", flush=True)
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        p50 = sorted(r["times"])[len(r["times"]) // 2]
        rows += [row("train_step", variant, "fwd+bwd+adamw", "step_time", "s", "tokens", tokens, r["times"], setup),
                 row("train_step", variant, "fwd+bwd+adamw", "tokens_per_s", "tok/s", "tokens", tokens,
                     [tokens / t for t in r["times"]], setup),
                 row("train_step", variant, "fwd+bwd+adamw", "first_step", "s", "tokens", tokens, r["first_step_s"],
                     setup),
                 row("train_step", variant, "fwd+bwd+adamw", "peak_memory", "MiB", "tokens", tokens, r["peak_mb"],
                     setup)]
        lines.append([variant, f"{p50 * 1e3:.1f}", f"{tokens / p50:.0f}", f"{r['first_step_s']:.1f}",
                      f"{r['peak_mb']:.0f}", f"{r['first_loss']:.4f}"])
    print(f"one training step, preset {args.preset!r}, batch {args.batch} x {args.seq}, bf16 autocast, {args.device}")
    print_table(["variant", "ms p50", "tokens/s", "first step s", "peak MiB", "first loss"], lines)
    print(f"CSV: {write_csv('train_step', rows)}")


# ---- the suite ---------------------------------------------------------------------------------------------------

def run_step(name: str, cmd: list[str], env: dict, limit: float, log: Path) -> dict:
    t0 = time.perf_counter()
    try:
        out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=limit)
        status, text = ("ok" if out.returncode == 0 else f"failed (rc {out.returncode})"), out.stdout + out.stderr
    except subprocess.TimeoutExpired as err:
        status = f"timed out after {limit:.0f} s"
        text = "".join(s.decode(errors="replace") if isinstance(s, bytes) else (s or "")
                       for s in (err.stdout, err.stderr))
    log.write_text(text)
    seconds = time.perf_counter() - t0
    print(f"[{name}] {status} in {seconds:.0f} s (log: {log})", flush=True)
    return {"status": status, "seconds": seconds}


def test_counts(junit: Path) -> dict:
    """passed / failed / skipped and the failing tests' names, from pytest's JUnit XML."""
    counts = {"passed": 0, "failed": 0, "skipped": 0, "failures": []}
    if not junit.is_file():
        return counts
    for case in ET.parse(junit).getroot().iter("testcase"):
        if case.find("failure") is not None or case.find("error") is not None:
            counts["failed"] += 1
            counts["failures"].append(f"{case.get('classname', '')}::{case.get('name', '')}")
        elif case.find("skipped") is not None:
            counts["skipped"] += 1
        else:
            counts["passed"] += 1
    return counts


def read_rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def value(rows, **key) -> float | None:
    for r in rows:
        if all(str(r.get(k)) == str(v) for k, v in key.items()):
            return float(r["p50"])
    return None


def targets(out: Path, device: str) -> list[tuple[str, float | None, str, bool | None]]:
    """(target, measured, unit, met) for each GPU target, from the benchmarks' CSVs."""
    fp8, moe, head = (read_rows(out / f"{n}.csv") for n in ("fp8_gemm", "moe_dispatch", "distill_head"))
    shape = FP8_TARGET_SHAPE if device == "cuda" else next((r["x_value"] for r in fp8), "")
    speedup = value(fp8, provider="kdarch", metric="speedup_vs_torch_bf16", x_value=shape)
    tflops = value(fp8, provider="kdarch", metric="throughput", x_value=shape)
    peak_frac = tflops / FP8_PEAK_TFLOPS if tflops is not None and device == "cuda" else None
    gemm = "triton" if device == "cuda" else "torch._grouped_mm"
    fractions = [g / d for t in sorted({r["x_value"] for r in moe})
                 if (g := value(moe, kernel="grouped_gemm", provider=gemm, metric="throughput", x_value=t))
                 and (d := value(moe, kernel="grouped_gemm", provider="dense", metric="throughput", x_value=t))]
    mem = [float(r["p50"]) for r in head if r["provider"] == "fused/naive" and r["metric"] == "memory_ratio"]
    tim = [float(r["p50"]) for r in head if r["provider"] == "fused/naive" and r["metric"] == "time_ratio"]
    met = lambda v, ok: None if v is None else bool(ok(v))  # noqa: E731
    worst = lambda vs, f: f(vs) if vs else None  # noqa: E731
    return [(f"FP8 GEMM vs torch bf16 at {shape} >= 1.5x", speedup, "x", met(speedup, lambda v: v >= 1.5)),
            ("FP8 GEMM >= 60% of 1979 TFLOP/s", peak_frac, "of peak", met(peak_frac, lambda v: v >= 0.6)),
            (f"MoE grouped GEMM ({gemm}) >= 70% of dense (worst token count)", worst(fractions, min), "of dense",
             met(worst(fractions, min), lambda v: v >= 0.7)),
            ("fused head memory <= 0.25x full logits", worst(mem, max), "x", met(worst(mem, max), lambda v: v <= 0.25)),
            ("fused head time <= 1.0x full logits", worst(tim, max), "x", met(worst(tim, max), lambda v: v <= 1.0))]


def summary(out: Path, device: str, name: str, results: dict, tests: dict, goals) -> str:
    lines = [f"# kdarch GPU suite: {name}", "",
             f"torch {torch.__version__}, triton {_version('triton')}, "
             f"transformer-engine {_version('transformer_engine')}",
             "", "| step | status | seconds |", "|---|---|---|"]
    lines += [f"| {s} | {r['status']} | {r['seconds']:.0f} |" for s, r in results.items()]
    lines += ["", f"Tests: {tests['passed']} passed, {tests['failed']} failed, {tests['skipped']} skipped"]
    lines += [f"- FAILED {f}" for f in tests["failures"]]
    lines += ["", "| target | measured | met |", "|---|---|---|"]
    for goal, measured, unit, ok in goals:
        shown = "not measured" if measured is None else f"{measured:.3f} {unit}"
        lines.append(f"| {goal} | {shown} | {'–' if ok is None else 'yes' if ok else 'no'} |")
    if device != "cuda":
        lines += ["", "(CPU check of the suite itself: these figures are not GPU results.)"]
    return "\n".join(lines) + "\n"


def _version(module: str) -> str:
    try:
        return __import__(module).__version__
    except Exception:  # not installed, or broken: the summary says so
        return "not installed"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--steps", nargs="+", choices=STEPS, default=list(STEPS))
    p.add_argument("--tests-k", help="pytest -k expression: run only the matching GPU tests")
    p.add_argument("--results-dir", type=Path, default=HERE / "results" / "gpu_suite")
    p.add_argument("--limit-scale", type=float,
                   help="multiply every step's time limit (default: 1 on CUDA, 4 on the CPU, where the GPU tests "
                        "run under the Triton interpreter)")
    # the train-step benchmark and its workers
    p.add_argument("--train-step", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--worker-variant", help=argparse.SUPPRESS)
    p.add_argument("--preset", default="bench", help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, default=16, help=argparse.SUPPRESS)
    p.add_argument("--seq", type=int, default=1024, help=argparse.SUPPRESS)
    p.add_argument("--repeat", type=int, default=5, help=argparse.SUPPRESS)
    p.add_argument("--variants", nargs="+", default=["torch", "triton"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker_variant:
        return train_step_worker(args) or 0
    if args.train_step:
        return train_step_bench(args) or 0

    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_suite: expected a CUDA device, found none (torch " + torch.__version__ + "); "
              "--device cpu runs the suite's steps here at small sizes", file=sys.stderr)
        return 2
    out = args.results_dir.resolve()
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "KDARCH_BENCH_RESULTS": str(out), "PYTHONPATH": str(ROOT)}
    if args.device == "cpu":
        env.update(KDARCH_GPU_SUITE_DEVICE="cpu", TRITON_INTERPRET="1")
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu (a check of the suite, not GPU figures)"
    print(f"GPU suite on {name}; results in {out}", flush=True)
    bench, results = step_args(args.device), {}
    for step in args.steps:
        if step == "tests":
            cmd = [sys.executable, "-m", "pytest", "tests/gpu", "-q", "-p", "no:cacheprovider",
                   f"--junitxml={out / 'tests.xml'}"] + (["-k", args.tests_k] if args.tests_k else [])
        elif step == "train_step":
            cmd = [sys.executable, __file__, "--train-step", "--device", args.device, *bench[step]]
        else:
            cmd = [sys.executable, str(HERE / f"{step}.py"), *bench[step]]
        scale = args.limit_scale or (1.0 if args.device == "cuda" else 4.0)
        results[step] = run_step(step, cmd, env, LIMITS[step] * scale, out / f"{step}.log")
    tests = test_counts(out / "tests.xml") if "tests" in args.steps else {"passed": 0, "failed": 0, "skipped": 0,
                                                                         "failures": []}
    goals = targets(out, args.device)
    write_csv("gpu_suite", [row("gpu_suite", "kdarch", "target", "measured", unit, "target", goal, measured,
                                {"met": ok}) for goal, measured, unit, ok in goals if measured is not None], out)
    text = summary(out, args.device, name, results, tests, goals)
    (out / "summary.md").write_text(text)
    print("\n" + text + f"\nsummary: {out / 'summary.md'}")
    return 0 if all(r["status"] == "ok" for r in results.values()) and not tests["failed"] else 1


if __name__ == "__main__":
    sys.exit(main())
