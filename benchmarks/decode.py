"""Greedy decoding: kdarch's latent-cache generation beside transformers' `generate` on the same weights.

    python benchmarks/decode.py --quick                  # about a minute: both configs, prompts 512 and 2048
    python benchmarks/decode.py                          # the full sweep (~15 min on 2 busy CPU cores)
    python benchmarks/decode.py --publish                # the full sweep, also copied to benchmarks/measured/
    python benchmarks/decode.py --configs bench --prompts 512 --batches 1 --new-tokens 32
    python benchmarks/decode.py --configs --model runs/distill-.../student/model   # MTP drafting on a trained model

Configs: "bench" (the bench preset) and "v3-attn" (the bench preset with DeepSeek-V3's attention shapes: 16
heads, qk 128 + 64 rope, v 128, kv latent 512, q latent 1536 — where the latent cache is ~9x smaller than
full-head K/V). Both models get kdarch's random weights, exported through the Hugging Face converter.
kdarch decodes on its LatentKVCache (prefill on expanded heads, one-token steps on the path
`kdarch.model.attention.choose_path` picks: printed); transformers' DeepseekV3ForCausalLM on its DynamicCache
of latents. The two sides are timed interleaved, call by call, in one process. A forward hook stamps the end of every
forward inside `generate`: the first is the prefill, each later one a decode step (forward + sampling), so the
decode rate is batch / the median step over --repeat calls, free of the prefill's noise. Cache bytes:
kdarch's latent cache, the tensors transformers' cache holds after the call (its DeepseekV3 caches the latent
too, and expands it to full heads at every step) and what full-head K/V would take. Greedy tokens of the two
must agree (printed). A second table times one decode step of kdarch's attention paths, each pinned, against
the same filled cache: the measurement behind the choice.
With --model DIR: MTP self-speculative decoding of that model vs its plain greedy decoding (acceptance,
tokens/s), on prompts of the model's own text (greedy continuations of a few one-token seeds).
Output: benchmarks/results/decode.csv (long form) and decode.png (tokens/s vs prompt length, with matplotlib);
--publish also writes both to benchmarks/measured/, the copy the README cites. Timing: CPU wall clock at fixed
--threads; CUDA synchronised.
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import MEASURED_DIR, RESULTS_DIR, print_table, row, write_csv  # noqa: E402

CONFIGS = {"bench": {},
           "v3-attn": dict(n_heads=16, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, kv_lora_rank=512,
                           q_lora_rank=1536)}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _seconds(fn, device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


class StepClock:
    """Timestamps of the end of each forward of `model` (a forward hook): the first is the prefill, each later
    one a decode step, so a generate call's decode time is measured inside it, not as a difference of calls."""

    def __init__(self, model, device: torch.device):
        self.device, self.stamps = device, []
        model.register_forward_hook(self._hook)

    def _hook(self, *_):
        _sync(self.device)
        self.stamps.append(time.perf_counter())

    def run(self, fn) -> tuple[float, list[float]]:
        """(prefill seconds, seconds of each decode step) of one call."""
        self.stamps = []
        _sync(self.device)
        t0 = time.perf_counter()
        fn()
        return self.stamps[0] - t0, [b - a for a, b in zip(self.stamps, self.stamps[1:])]


def _interleaved(fns: dict, repeat: int, device: torch.device) -> dict[str, list[float]]:
    """Seconds of each fn, called in turn `repeat` times (order alternating), so drift hits every side alike."""
    out = {k: [] for k in fns}
    for r in range(repeat):
        for k in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
            out[k].append(_seconds(fns[k], device))
    return out


def _cache_of(out):
    """The cache a `generate(..., return_dict_in_generate=True)` result carries (its key was renamed)."""
    return out["cache"] if "cache" in out else out.past_key_values


def _hf_cache_bytes(cache) -> int:
    """Bytes of the keys and values a transformers cache holds (layer objects or legacy tuples)."""
    total = 0
    for layer in getattr(cache, "layers", None) or []:
        total += sum(t.nbytes for t in (getattr(layer, "keys", None), getattr(layer, "values", None))
                     if isinstance(t, torch.Tensor))
    if total == 0 and hasattr(cache, "to_legacy_cache"):
        total = sum(t.nbytes for kv in cache.to_legacy_cache() for t in kv)
    return total


def bench_paths(name: str, model, P: int, args, dev, rows: list, lines: list) -> None:
    """One decode step (batch 1) against a cache of P tokens, per pinned attention path."""
    from kdarch.model import LatentKVCache
    from kdarch.model.attention import choose_path, set_path
    cfg = model.config
    cache = LatentKVCache(cfg, 1, P + 1, device=dev)
    tok = torch.tensor([[1]], device=dev)
    with torch.inference_mode():
        model(torch.randint(0, cfg.vocab_size, (1, P), generator=torch.Generator().manual_seed(P)).to(dev),
              cache=cache)

        def step(path):
            def fn():
                set_path(model, path)
                model(tok, cache=cache, position_ids=torch.tensor([P], device=dev))
                cache.truncate(P)
            return fn
        paths = ("absorbed", "expanded")
        for p in paths:
            step(p)()  # warm up
        t = _interleaved({p: step(p) for p in paths}, args.path_repeat, dev)
    set_path(model, "auto")
    ms = {p: 1e3 * min(v) for p, v in t.items()}
    setup = {"config": name, "batch": 1, "prompt": P, "dtype": "float32", "threads": args.threads}
    for p in paths:
        rows.append(row("decode_step", f"kdarch-{p}", "greedy", "step_ms", "ms", "prompt", P,
                        [1e3 * s for s in t[p]], setup))
    lines.append([name, P, f"{ms['absorbed']:.2f}", f"{ms['expanded']:.2f}",
                  f"{ms['expanded'] / ms['absorbed']:.2f}x", choose_path(1, P + 1, cfg)])


def bench_config(name: str, args, dev: torch.device, rows: list, lines: list, path_lines: list) -> None:
    from transformers import AutoModelForCausalLM

    import kdarch
    from kdarch.model.attention import choose_path
    longest = max(args.prompts) + args.new_tokens
    cfg = kdarch.get_preset("bench", **CONFIGS[name], max_seq_len=max(1024, longest))
    torch.manual_seed(0)
    model = kdarch.CausalLM(cfg).eval()
    with tempfile.TemporaryDirectory() as tmp:
        kdarch.save_pretrained(model, Path(tmp) / "hf", format="hf")
        hf = AutoModelForCausalLM.from_pretrained(Path(tmp) / "hf", dtype=torch.float32).eval()
    model, hf = model.to(dev), hf.to(dev)
    clocks = {"kdarch": StepClock(model, dev), "transformers": StepClock(hf, dev)}
    N = args.new_tokens
    for B in args.batches:
        for P in [P for P in args.prompts if B == 1 or B * P <= args.max_batch_tokens]:
            ids = torch.randint(0, cfg.vocab_size, (B, P), generator=torch.Generator().manual_seed(P)).to(dev)
            prompts = ids.tolist()
            out = {}

            def ours(prompts=prompts, out=out):
                out["kdarch"] = model.generate(prompts, N, eos_token_id=-1)

            def theirs(ids=ids, out=out):
                with torch.inference_mode():
                    out["transformers"] = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=N,
                                                      min_new_tokens=N, do_sample=False, return_dict_in_generate=True,
                                                      pad_token_id=0)
            prefill, steps = {k: [] for k in clocks}, {k: [] for k in clocks}
            for r in range(args.repeat):  # interleaved, order alternating: drift hits both sides alike
                for provider, fn in ((("kdarch", ours), ("transformers", theirs))[::1 if r % 2 == 0 else -1]):
                    t_prefill, t_steps = clocks[provider].run(fn)
                    prefill[provider].append(t_prefill)
                    steps[provider] += t_steps
            same = out["kdarch"] == out["transformers"].sequences[:, P:].tolist()
            cache = {"kdarch": B * (P + N) * cfg.kv_cache_bytes_per_token(latent=True, dtype_bytes=4),
                     "transformers": _hf_cache_bytes(_cache_of(out.pop("transformers")))}
            full_heads = B * (P + N) * cfg.kv_cache_bytes_per_token(latent=False, dtype_bytes=4)
            path = choose_path(1, P + N, cfg)
            setup = {"config": name, "batch": B, "prompt": P, "new_tokens": N, "repeat": args.repeat,
                     "dtype": "float32", "threads": args.threads, "kdarch_decode_path": path,
                     "kdarch_prefill_path": choose_path(P, P, cfg)}
            rate = {k: statistics.median([B / s for s in v]) for k, v in steps.items()}  # robust to spikes
            for provider in clocks:
                rows += [row("decode", provider, "greedy", "tokens_per_s", "tok/s", "prompt", P,
                             [B / s for s in steps[provider]], setup),
                         row("decode", provider, "greedy", "prefill", "s", "prompt", P, prefill[provider], setup),
                         row("decode", provider, "greedy", "cache_bytes", "B", "prompt", P, cache[provider], setup)]
            rows.append(row("decode", "full-head-kv", "greedy", "cache_bytes", "B", "prompt", P, full_heads, setup))
            ratio = rate["kdarch"] / rate["transformers"]
            rows.append(row("decode", "kdarch/transformers", "greedy", "speed_ratio", "x", "prompt", P, ratio, setup))
            lines.append([name, B, P, f"{rate['kdarch']:.1f}", f"{rate['transformers']:.1f}", f"{ratio:.2f}x",
                          f"{min(prefill['kdarch']):.2f}", f"{min(prefill['transformers']):.2f}",
                          f"{cache['kdarch'] / 2**20:.1f}", f"{cache['transformers'] / 2**20:.1f}",
                          f"{full_heads / 2**20:.1f}", path, "yes" if same else "NO"])
            print(f"  {name} B={B} P={P}: {rate['kdarch']:.1f} vs {rate['transformers']:.1f} tok/s ({ratio:.2f}x), "
                  f"decode path {path}, same tokens: {same}", flush=True)
            if B == 1 and args.path_repeat:
                bench_paths(name, model, P, args, dev, rows, path_lines)


def plot(rows: list, path: Path) -> Path | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install kdarch[bench])")
        return None
    import json
    pts = {}
    for r in rows:
        setup = json.loads(r["config"])
        if r["kernel"] == "decode" and r["metric"] == "tokens_per_s" and setup["batch"] == 1:
            pts.setdefault(setup["config"], {}).setdefault(r["provider"], []).append((r["x_value"], r["p50"]))
    if not pts:
        return None
    fig, axes = plt.subplots(1, len(pts), figsize=(5.5 * len(pts), 4), squeeze=False)
    for ax, (cfg, by_provider) in zip(axes[0], sorted(pts.items())):
        for provider, xy in sorted(by_provider.items()):
            ax.plot(*zip(*sorted(xy)), marker="o", label=provider)
        ax.set(title=f"{cfg}: greedy decoding, batch 1", xlabel="prompt tokens", ylabel="new tokens / s")
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted({x for xy in by_provider.values() for x, _ in xy}))
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.set_ylim(bottom=0)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def bench_speculative(path: str, args, dev: torch.device, rows: list) -> None:
    """MTP drafting vs plain greedy on a trained model: acceptance and tokens/s."""
    import kdarch
    from kdarch.model import generate_speculative
    model = kdarch.from_pretrained(path).to(dev).eval()
    seeds = [[t] for t in range(1, 1 + args.spec_prompts)]
    prompts = [s + model.generate([s], 15, eos_token_id=-1)[0] for s in seeds]  # the model's own text as prompts
    n, drafted, accepted, t_spec, t_greedy = args.new_tokens, 0, 0, 0.0, 0.0
    for p in prompts:
        t0 = time.perf_counter()
        spec, stats = generate_speculative(model, p, n, eos_token_id=-1)
        t_spec += time.perf_counter() - t0
        t0 = time.perf_counter()
        greedy = model.generate([p], n, eos_token_id=-1)[0]
        t_greedy += time.perf_counter() - t0
        assert spec == greedy, "speculative decoding must give the greedy tokens"
        drafted, accepted = drafted + stats.drafted, accepted + stats.accepted
    acceptance, speed = accepted / max(drafted, 1), t_greedy / t_spec
    setup = {"model": path, "prompts": len(prompts), "new_tokens": n}
    rows += [row("speculative", "kdarch-mtp", "greedy", "acceptance", "ratio", "new_tokens", n, acceptance, setup),
             row("speculative", "kdarch-mtp", "greedy", "speed_vs_greedy", "x", "new_tokens", n, speed, setup)]
    print(f"\nMTP drafting on {path}: acceptance {acceptance:.1%} (target >= 80%), {speed:.2f}x greedy tokens/s "
          f"(target >= 1.4x), over {len(prompts)} prompts x {n} tokens; output identical to greedy")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="*", choices=sorted(CONFIGS), default=sorted(CONFIGS),
                   help="configs to compare with transformers (none: only the --model measurement)")
    p.add_argument("--prompts", type=int, nargs="+", default=[512, 1024, 2048, 4096], help="prompt lengths")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--max-batch-tokens", type=int, default=4096,
                   help="batches above 1 run only the prompts with batch x prompt <= this")
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--path-repeat", type=int, default=3, help="repeats of the per-path decode step (0: skip it)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="prompts 512 and 2048, batch 1, 8 new tokens, 1 call each")
    p.add_argument("--publish", action="store_true", help="also write the CSV and plot to benchmarks/measured/")
    p.add_argument("--model", help="a trained kdarch model directory: also measure MTP drafting on it")
    p.add_argument("--spec-prompts", type=int, default=8)
    p.add_argument("--out", default="decode", help="CSV / plot name under benchmarks/results/")
    args = p.parse_args()
    if args.quick:
        args.prompts, args.batches, args.new_tokens, args.repeat, args.path_repeat = [512, 2048], [1], 8, 1, 3
    torch.set_num_threads(args.threads)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows, lines, path_lines = [], [], []
    for name in args.configs:
        bench_config(name, args, dev, rows, lines, path_lines)
    if lines:
        print(f"\ngreedy decoding, {args.new_tokens} new tokens, fp32, {dev}"
              + (f", {args.threads} threads" if dev.type == "cpu" else ""))
        print_table(["config", "batch", "prompt", "kdarch tok/s", "hf tok/s", "speed", "kdarch prefill s",
                     "hf prefill s", "kdarch cache MiB", "hf cache MiB", "full-head MiB", "decode path", "same tokens"],
                    lines)
    if path_lines:
        print("\none decode step, batch 1, each kdarch attention path pinned (ms; auto = what choose_path picks)")
        print_table(["config", "prompt", "absorbed ms", "expanded ms", "expanded/absorbed", "auto"], path_lines)
    if args.model:
        bench_speculative(args.model, args, dev, rows)
    csv_path = write_csv(args.out, rows)
    png = plot(rows, RESULTS_DIR / f"{args.out}.png")
    print(f"CSV: {csv_path}" + (f", plot: {png}" if png else ""))
    if args.publish:
        MEASURED_DIR.mkdir(exist_ok=True)
        for f in (csv_path, png):
            if f is not None:
                shutil.copy(f, MEASURED_DIR / f.name)
        print(f"published to {MEASURED_DIR}")


if __name__ == "__main__":
    main()
