"""Autoregressive generation on the latent KV cache: greedy, temperature, top-k and top-p sampling.

Prompts of different lengths are left-padded into one batch; padding slots are masked out of attention
and every row gets its own rope positions, so a row's tokens do not depend on what it is batched with.

Shape legend: B batch, T tokens, V vocabulary.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from kdarch.model.cache import LatentKVCache


def sample_next(logits_BV: torch.Tensor, *, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row: argmax when temperature == 0, otherwise a sample from the filtered softmax."""
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
    return torch.multinomial(logits_BV.softmax(dim=-1), 1, generator=generator).squeeze(1)


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


@torch.no_grad()
def generate(model, prompts, max_new_tokens: int, *, temperature: float = 0.0, top_k: int = 0,
             top_p: float = 1.0, eos_token_id: int | None = None, generator: torch.Generator | None = None,
             cache_dtype: torch.dtype | None = None) -> list[list[int]]:
    """Continue each prompt by up to `max_new_tokens` tokens; returns the new tokens per prompt, ending
    with `eos_token_id` (default: the config's) where it was produced."""
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
    cache = LatentKVCache(cfg, B, T + max_new_tokens, dtype=cache_dtype or model.embed.weight.dtype, device=device)
    logits_BV = model(ids_BT, cache=cache, position_ids=pos_BT, valid_mask=valid_BT).logits[:, -1]
    next_pos_B1 = pos_BT[:, -1:] + 1
    out: list[list[int]] = [[] for _ in range(B)]
    done = torch.zeros(B, dtype=torch.bool, device=device)
    for step in range(max_new_tokens):
        tok_B = sample_next(logits_BV, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
        for i in (~done).nonzero().flatten().tolist():
            out[i].append(int(tok_B[i]))
        if eos is not None:
            done |= tok_B == eos
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        logits_BV = model(tok_B[:, None], cache=cache, position_ids=next_pos_B1).logits[:, -1]
        next_pos_B1 = next_pos_B1 + 1
    model.train(was_training)
    return out
