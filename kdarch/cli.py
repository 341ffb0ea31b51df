"""The `kdarch` command line (also `python -m kdarch`).

    kdarch info [--preset NAME]        sizes of a preset: parameters, active parameters, KV-cache bytes/token
    kdarch demo [--steps N]            build the tiny student, train it briefly on embedded text, generate
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from kdarch.config import PRESETS, ModelConfig, get_preset


def describe(cfg: ModelConfig) -> dict[str, float]:
    return {
        "params_total": cfg.num_params(),
        "params_active_per_token": cfg.num_active_params(),
        "kv_cache_bytes_per_token_latent_bf16": cfg.kv_cache_bytes_per_token(latent=True),
        "kv_cache_bytes_per_token_full_heads_bf16": cfg.kv_cache_bytes_per_token(latent=False),
    }


def embedded_text() -> bytes:
    """Real English text that ships with every Python: the pydoc topic help."""
    from pydoc_data.topics import topics
    return "\n\n".join(topics[k] for k in sorted(topics)).encode("utf-8")


def cmd_info(args) -> int:
    cfg = get_preset(args.preset)
    print(json.dumps({"preset": args.preset, **describe(cfg)}, indent=2))
    return 0


def cmd_demo(args) -> int:
    from kdarch.model import CausalLM

    torch.manual_seed(args.seed)
    cfg = get_preset("tiny", max_seq_len=256)
    model = CausalLM(cfg)
    print(f"kdarch demo: preset 'tiny' (MLA + {cfg.n_routed_experts}-expert top-{cfg.num_experts_per_tok} MoE "
          f"+ {cfg.n_mtp_modules} MTP module)")
    fig = describe(cfg)
    print(f"  parameters: {fig['params_total'] / 1e6:.2f}M total, {fig['params_active_per_token'] / 1e6:.2f}M active/token"
          f" (counted in the model: {model.num_params() / 1e6:.2f}M)")
    print(f"  KV cache per token (bf16): {fig['kv_cache_bytes_per_token_latent_bf16']} B latent vs "
          f"{fig['kv_cache_bytes_per_token_full_heads_bf16']} B full-head "
          f"({fig['kv_cache_bytes_per_token_full_heads_bf16'] / fig['kv_cache_bytes_per_token_latent_bf16']:.1f}x smaller)")

    data = torch.tensor(list(embedded_text()), dtype=torch.long)  # byte-level tokens (ids < 256)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    model.attach_bias_update(opt)
    seq, batch = 128, 8
    t0 = time.perf_counter()
    for step in range(1, args.steps + 1):
        starts = torch.randint(0, data.numel() - seq, (batch,))
        ids = torch.stack([data[s:s + seq] for s in starts])
        out = model(ids, labels=ids)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step == 1 or step % max(1, args.steps // 5) == 0 or step == args.steps:
            print(f"  step {step:4d}  loss {out.lm_loss.item():.3f}  mtp {out.mtp_loss.item():.3f}  "
                  f"{step * batch * seq / (time.perf_counter() - t0):.0f} tok/s")
    prompt = list(b"The ")
    t0 = time.perf_counter()
    new = model.generate([prompt], args.new_tokens, temperature=0.8, top_k=40,
                         generator=torch.Generator().manual_seed(args.seed))[0]
    dt = time.perf_counter() - t0
    text = bytes(t for t in prompt + new if t < 256).decode("utf-8", errors="replace")
    print(f"  sampled {len(new)} tokens (T=0.8, top-k 40) in {dt:.2f}s on the latent KV cache: {text!r}")
    from kdarch.model import generate_speculative
    drafted, stats = generate_speculative(model, prompt, args.new_tokens)
    same = drafted == model.generate([prompt], args.new_tokens)[0]
    print(f"  greedy with the MTP module drafting: {len(drafted)} tokens in {stats.main_steps + 1} main-model steps "
          f"(draft acceptance {stats.acceptance:.0%}); {'identical to' if same else 'DIFFERENT from'} plain greedy")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kdarch", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="print a preset's sizes")
    info.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="model preset")
    info.set_defaults(fn=cmd_info)
    demo = sub.add_parser("demo", help="build the tiny student, train it briefly, generate")
    demo.add_argument("--steps", type=int, default=60, help="training steps on embedded text (default 60)")
    demo.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate")
    demo.add_argument("--new-tokens", type=int, default=48, help="tokens to generate")
    demo.add_argument("--seed", type=int, default=0, help="random seed")
    demo.set_defaults(fn=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
