"""Autoregressive generation on the latent KV cache: greedy, temperature, top-k and top-p sampling,
eager on a growing cache or compiled on a static one.

Prompts of different lengths are left-padded into one batch; padding slots are masked out of attention
and every row gets its own rope positions, so a row's tokens do not depend on what it is batched with.
A batch without padding builds no mask at all. Eager generation runs under `torch.inference_mode` (or
`torch.no_grad`, `inference_mode=False`, for an FSDP-sharded model); the prefill attends on expanded heads
and each one-token step on the latent cache (`kdarch.model.attention.choose_path`).

Shape legend: B batch, T tokens, V vocabulary.
"""
from __future__ import annotations

import functools
from collections.abc import Sequence

import torch

from kdarch.model.cache import LatentKVCache, StaticLatentKVCache


def sample_next(logits_BV: torch.Tensor, *, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                generator: torch.Generator | Sequence[torch.Generator] | None = None) -> torch.Tensor:
    """One token per row: argmax when temperature == 0, otherwise a sample from the filtered softmax (with one
    generator per row when `generator` is a sequence, so that a row's tokens do not depend on its batch)."""
    if temperature < 0 or not 0.0 < top_p <= 1.0 or top_k < 0:
        raise ValueError(f"sampling: expected temperature >= 0, 0 < top_p <= 1, top_k >= 0; "
                         f"got temperature={temperature}, top_p={top_p}, top_k={top_k}")
    if temperature == 0.0:
        return logits_BV.argmax(dim=-1)
    logits_BV = logits_BV.float() / temperature
    if 0 < top_k < logits_BV.shape[-1]:
        kth_B1 = logits_BV.topk(top_k, dim=-1).values[:, -1:]
        logits_BV = logits_BV.masked_fill(logits_BV < kth_B1, float("-inf"))
    if top_p < 1.0:
        sorted_BV, order_BV = logits_BV.sort(dim=-1, descending=True)
        mass_before_BV = sorted_BV.softmax(dim=-1).cumsum(dim=-1) - sorted_BV.softmax(dim=-1)
        drop_BV = mass_before_BV >= top_p  # keep the smallest prefix whose mass reaches top_p (never empty)
        logits_BV = logits_BV.scatter(1, order_BV, sorted_BV.masked_fill(drop_BV, float("-inf")))
    probs_BV = logits_BV.softmax(dim=-1)
    if isinstance(generator, Sequence):
        return torch.cat([torch.multinomial(probs_BV[i:i + 1], 1, generator=g) for i, g in enumerate(generator)]
                         ).squeeze(1)
    return torch.multinomial(probs_BV, 1, generator=generator).squeeze(1)


def left_pad(prompts: Sequence[Sequence[int]] | torch.Tensor, pad_id: int = 0, device=None):
    """Prompts -> (ids [B, T], valid [B, T] bool, positions [B, T]) with every prompt right-aligned."""
    if isinstance(prompts, torch.Tensor):
        if prompts.dim() != 2:
            raise ValueError(f"generate: expected prompts as a [batch, seq_len] tensor or a list of id lists, "
                             f"got a tensor of shape {tuple(prompts.shape)}")
        prompts = prompts.tolist()
    if len(prompts) == 0 or any(len(p) == 0 for p in prompts):
        raise ValueError("generate: expected at least one prompt, each with at least one token")
    T = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    valid = torch.zeros(len(prompts), T, dtype=torch.bool)
    for i, p in enumerate(prompts):
        ids[i, T - len(p):] = torch.as_tensor(list(p), dtype=torch.long)
        valid[i, T - len(p):] = True
    positions = (valid.long().cumsum(dim=1) - 1).clamp_min(0)
    return ids.to(device), valid.to(device), positions.to(device)


STATIC_CACHE_BUCKET = 256
"""A static cache's slot count is rounded up to a multiple of this, so prompts of similar lengths share one
compiled graph."""
DONE_CHECK_EVERY = 8
"""Steps between the host's looks at whether every row has ended: each look is a read, which drains the stream."""


def decode_step(model, tok_B1: torch.Tensor, pos_B1: torch.Tensor, cache: LatentKVCache) -> torch.Tensor:
    """Append one token per row at `pos_B1` and return the next-token logits [B, V]. On a
    StaticLatentKVCache every shape is fixed and nothing is read back: the unit `generate(compile=True)`
    compiles (a CUDA graph with mode="reduce-overhead")."""
    return model(tok_B1, cache=cache, position_ids=pos_B1).logits[:, -1]


@functools.cache
def compiled_decode_step(device_type: str):
    """`decode_step` compiled once per device type; on CUDA captured as a CUDA graph."""
    mode = "reduce-overhead" if device_type == "cuda" else None
    return torch.compile(decode_step, fullgraph=True, mode=mode)


def generate(model, prompts, max_new_tokens: int, *, temperature: float = 0.0, top_k: int = 0,
             top_p: float = 1.0, eos_token_id: int | None = None,
             generator: torch.Generator | Sequence[torch.Generator] | None = None,
             cache_dtype: torch.dtype | None = None, compile: bool = False,
             inference_mode: bool = True) -> list[list[int]]:
    """Continue each prompt by up to `max_new_tokens` tokens; returns the new tokens per prompt, ending
    with `eos_token_id` (default: the config's) where it was produced. `compile=True` decodes on a
    preallocated StaticLatentKVCache with the compiled `decode_step` (same tokens, fixed shapes).
    `generator`: one, or one per prompt. `inference_mode=False` decodes under `torch.no_grad` instead (an
    FSDP-sharded model's gathered weights must stay usable by the training step that follows)."""
    # inference mode drops autograd's per-op bookkeeping; torch.compile cannot trace the views of its tensors
    with torch.no_grad() if compile or not inference_mode else torch.inference_mode():
        return _generate(model, prompts, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                         eos_token_id=eos_token_id, generator=generator, cache_dtype=cache_dtype, compile=compile)


def _generate(model, prompts, max_new_tokens, *, temperature, top_k, top_p, eos_token_id, generator, cache_dtype,
              compile):
    cfg = model.config
    eos = cfg.eos_token_id if eos_token_id is None else eos_token_id
    device = next(model.parameters()).device
    ids_BT, valid_BT, pos_BT = left_pad(prompts, device=device)
    B, T = ids_BT.shape
    if max_new_tokens < 1:
        raise ValueError(f"generate: expected max_new_tokens >= 1, got {max_new_tokens}")
    if T + max_new_tokens > cfg.max_seq_len:
        raise ValueError(f"generate: prompt ({T}) + max_new_tokens ({max_new_tokens}) exceeds "
                         f"ModelConfig.max_seq_len={cfg.max_seq_len}")
    was_training = model.training
    model.eval()
    dtype = cache_dtype or model.embed.weight.dtype
    if compile:
        slots = min(cfg.max_seq_len, -(-(T + max_new_tokens) // STATIC_CACHE_BUCKET) * STATIC_CACHE_BUCKET)
        cache = StaticLatentKVCache(cfg, B, slots, dtype=dtype, device=device)
        step_fn = compiled_decode_step(device.type)
    else:
        cache, step_fn = LatentKVCache(cfg, B, T + max_new_tokens, dtype=dtype, device=device), decode_step
    padded = not isinstance(prompts, torch.Tensor) and any(len(p) != T for p in prompts)
    logits_BV = model(ids_BT, cache=cache, position_ids=pos_BT, valid_mask=valid_BT if padded else None).logits[:, -1]
    pos_B1 = pos_BT[:, -1:] + 1
    new_BN = torch.zeros(B, max_new_tokens, dtype=torch.long, device=device)
    done_B = torch.zeros(B, dtype=torch.bool, device=device)
    for step in range(max_new_tokens):
        tok_B = sample_next(logits_BV, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
        new_BN[:, step] = tok_B
        if eos is not None:
            done_B |= tok_B == eos
        if step == max_new_tokens - 1 or (step % DONE_CHECK_EVERY == DONE_CHECK_EVERY - 1 and bool(done_B.all())):
            break
        logits_BV = step_fn(model, tok_B[:, None], pos_B1, cache)
        pos_B1 = pos_B1 + 1
    model.train(was_training)
    return [row[:row.index(eos) + 1] if eos in row else row for row in new_BN[:, :step + 1].tolist()]
