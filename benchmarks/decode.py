"""Greedy decoding: kdarch's latent-cache generation beside transformers' `generate` on the same weights.

    python benchmarks/decode.py                          # bench preset and DeepSeek-V3 attention shapes, CPU
    python benchmarks/decode.py --configs bench --prompts 512 --batches 1 --new-tokens 32
    python benchmarks/decode.py --model runs/distill-.../student/model   # + MTP drafting on a trained model

Configs: "bench" (the bench preset) and "v3-attn" (the bench preset with DeepSeek-V3's attention shapes: 16
heads, qk 128 + 64 rope, v 128, kv latent 512, q latent 1536 — where the latent cache is ~9x smaller than
full-head K/V). Both models get kdarch's random weights, exported through the Hugging Face converter.
kdarch decodes on its LatentKVCache with absorbed attention; transformers' DeepseekV3ForCausalLM on its
DynamicCache, up-projecting the cached latent to full heads at every step. The decode rate excludes the
prompt: (N - 1) / (t(N) - t(1)), with t(n) the shortest of --repeat `generate` calls for n new tokens (the
least disturbed; "nan" where noise swamps the decode time); t(1) is reported as prefill. Cache bytes:
kdarch's cache tensors, the tensors transformers' cache holds after the call (its DeepseekV3 caches the
latent too), and what full-head K/V would take. Greedy tokens of the two must agree (printed).
With --model DIR: MTP self-speculative decoding of that model vs its plain greedy decoding (acceptance,
tokens/s), on prompts of the model's own text (greedy continuations of a few one-token seeds).
CSV: benchmarks/results/decode.csv. Timing: CPU wall clock at fixed --threads; CUDA synchronised.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table, row, write_csv  # noqa: E402

CONFIGS = {"bench": {},
           "v3-attn": dict(n_heads=16, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, kv_lora_rank=512,
                           q_lora_rank=1536)}


def _timed(fn, repeat: int, device: torch.device) -> float:
    times = []
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return min(times)  # the least disturbed call: a shared machine only ever adds time


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


def bench_config(name: str, args, dev: torch.device, rows: list, lines: list) -> None:
    from transformers import AutoModelForCausalLM

    import kdarch
    longest = max(args.prompts) + args.new_tokens
    cfg = kdarch.get_preset("bench", **CONFIGS[name], max_seq_len=max(1024, longest))
    torch.manual_seed(0)
    model = kdarch.CausalLM(cfg).eval()
    with tempfile.TemporaryDirectory() as tmp:
        kdarch.save_pretrained(model, Path(tmp) / "hf", format="hf")
        hf = AutoModelForCausalLM.from_pretrained(Path(tmp) / "hf", dtype=torch.float32).eval()
    model, hf = model.to(dev), hf.to(dev)
    for B in args.batches:
        for P in args.prompts:
            ids = torch.randint(0, cfg.vocab_size, (B, P), generator=torch.Generator().manual_seed(P)).to(dev)
            prompts = ids.tolist()

            def ours(n, prompts=prompts):
                return model.generate(prompts, n, eos_token_id=-1)

            def theirs(n, ids=ids):
                with torch.no_grad():
                    return hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                                       do_sample=False, return_dict_in_generate=True, pad_token_id=0)
            same = [o[:8] for o in ours(8)] == theirs(8).sequences[:, P:].tolist()
            t = {}
            for provider, fn in (("kdarch", ours), ("transformers", theirs)):
                t[provider] = (_timed(lambda fn=fn: fn(1), args.repeat, dev),
                               _timed(lambda fn=fn: fn(args.new_tokens), args.repeat, dev))
            cache = {"kdarch": B * (P + args.new_tokens) * cfg.kv_cache_bytes_per_token(latent=True, dtype_bytes=4),
                     "transformers": _hf_cache_bytes(_cache_of(theirs(args.new_tokens)))}
            full_heads = B * (P + args.new_tokens) * cfg.kv_cache_bytes_per_token(latent=False, dtype_bytes=4)
            setup = {"config": name, "batch": B, "prompt": P, "new_tokens": args.new_tokens, "dtype": "float32",
                     "threads": args.threads}
            rate = {}
            for provider, (t1, tn) in t.items():
                rate[provider] = B * (args.new_tokens - 1) / (tn - t1) if tn > t1 else float("nan")
                rows += [row("decode", provider, "greedy", "tokens_per_s", "tok/s", "prompt", P, rate[provider], setup),
                         row("decode", provider, "greedy", "prefill", "s", "prompt", P, t1, setup),
                         row("decode", provider, "greedy", "cache_bytes", "B", "prompt", P, cache[provider], setup)]
            ratio = rate["kdarch"] / rate["transformers"]
            rows.append(row("decode", "kdarch/transformers", "greedy", "speed_ratio", "x", "prompt", P, ratio, setup))
            lines.append([name, B, P, f"{rate['kdarch']:.1f}", f"{rate['transformers']:.1f}", f"{ratio:.2f}x",
                          f"{t['kdarch'][0]:.2f}", f"{t['transformers'][0]:.2f}",
                          f"{cache['kdarch'] / 2**20:.1f}", f"{cache['transformers'] / 2**20:.1f}",
                          f"{full_heads / 2**20:.1f}",
                          "yes" if same else "NO"])
            print(f"  {name} B={B} P={P}: {rate['kdarch']:.1f} vs {rate['transformers']:.1f} tok/s ({ratio:.2f}x)",
                  flush=True)


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
    p.add_argument("--prompts", type=int, nargs="+", default=[512, 2048, 4096], help="prompt lengths")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--model", help="a trained kdarch model directory: also measure MTP drafting on it")
    p.add_argument("--spec-prompts", type=int, default=8)
    p.add_argument("--out", default="decode", help="CSV name under benchmarks/results/")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows, lines = [], []
    for name in args.configs:
        bench_config(name, args, dev, rows, lines)
    if lines:
        print(f"\ngreedy decoding, {args.new_tokens} new tokens, fp32, {dev}"
              + (f", {args.threads} threads" if dev.type == "cpu" else ""))
        print_table(["config", "batch", "prompt", "kdarch tok/s", "hf tok/s", "speed", "kdarch prefill s",
                    "hf prefill s", "kdarch cache MiB", "hf cache MiB", "full-head MiB", "same tokens"], lines)
    if args.model:
        bench_speculative(args.model, args, dev, rows)
    print(f"CSV: {write_csv(args.out, rows)}")


if __name__ == "__main__":
    main()
