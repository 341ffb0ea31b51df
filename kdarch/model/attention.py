"""Multi-head latent attention (MLA), DeepSeek-V2/V3 style.

Keys and values of all heads are up-projected from one small per-token latent, plus one rope key shared
by every head. Two paths compute the same function:
- training / full forward: expand the latent to full K and V and run PyTorch's fused SDPA (causal);
- cached (generation): keep only [latent, k_rope] per token and fold the up-projection into the query
  (scores = (q_nope W_uk) . latent + q_rope . k_rope) and into the output ((p . latent) W_uv), so the
  cache never holds per-head keys or values.

Shape legend: B batch, T query tokens, S key tokens, H heads, D model width, C kv latent width,
N qk nope width, R rope width, V value width.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kdarch.config import ModelConfig
from kdarch.model.cache import LatentKVCache
from kdarch.model.layers import RMSNorm, apply_rope, linear

LATENT_NORM_EPS = 1e-6  # the q / kv latent norms use DeepSeek-V3's fixed eps, whatever rms_norm_eps is


class MLA(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.nope_dim, self.rope_dim, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.kv_rank = cfg.kv_lora_rank
        self.softmax_scale = cfg.softmax_scale
        qk_out = cfg.n_heads * cfg.qk_head_dim
        if cfg.q_lora_rank:
            self.wq_a = linear(cfg.hidden_size, cfg.q_lora_rank, cfg.fp8)
            self.q_norm = RMSNorm(cfg.q_lora_rank, LATENT_NORM_EPS)
            self.wq_b = linear(cfg.q_lora_rank, qk_out, cfg.fp8)
        else:
            self.wq = linear(cfg.hidden_size, qk_out, cfg.fp8)
        self.wkv_a = linear(cfg.hidden_size, cfg.kv_lora_rank + cfg.qk_rope_head_dim, cfg.fp8)
        self.kv_norm = RMSNorm(cfg.kv_lora_rank, LATENT_NORM_EPS)
        # the KV up-projection stays high precision: cached decoding folds its weight into q and the output
        self.wkv_b = nn.Linear(cfg.kv_lora_rank, cfg.n_heads * (cfg.qk_nope_head_dim + cfg.v_head_dim), bias=False)
        self.wo = linear(cfg.n_heads * cfg.v_head_dim, cfg.hidden_size, cfg.fp8)

    def forward(self, x_BTD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layer_id: int = 0,
                cache: LatentKVCache | None = None) -> torch.Tensor:
        B, T, _ = x_BTD.shape
        q = self.wq_b(self.q_norm(self.wq_a(x_BTD))) if hasattr(self, "wq_a") else self.wq(x_BTD)
        q_BTHK = q.view(B, T, self.n_heads, -1)
        q_BTHK[..., self.nope_dim:] = apply_rope(q_BTHK[..., self.nope_dim:], cos, sin)  # in place: no q copy
        latent_BTC, k_rope_BTR = self.wkv_a(x_BTD).split([self.kv_rank, self.rope_dim], dim=-1)
        latent_BTC = self.kv_norm(latent_BTC)
        k_rope_BTR = apply_rope(k_rope_BTR, cos, sin)
        if cache is None:
            o_BTHV = self._full(q_BTHK, latent_BTC, k_rope_BTR)
        else:
            latent_BSC, k_rope_BSR = cache.update(layer_id, latent_BTC, k_rope_BTR)
            q_nope_BTHN, q_rope_BTHR = q_BTHK.split([self.nope_dim, self.rope_dim], dim=-1)
            o_BTHV = self._absorbed(q_nope_BTHN, q_rope_BTHR, latent_BSC, k_rope_BSR, cache.attention_mask(T))
        return self.wo(o_BTHV.flatten(2))

    def _full(self, q_BTHK, latent_BTC, k_rope_BTR) -> torch.Tensor:
        B, T, H, _ = q_BTHK.shape
        k_nope_BTHN, v_BTHV = self.wkv_b(latent_BTC).view(B, T, H, -1).split([self.nope_dim, self.v_dim], dim=-1)
        q_BHTK = q_BTHK.transpose(1, 2)
        k_BHTK = torch.cat((k_nope_BTHN, k_rope_BTR[:, :, None].expand(B, T, H, self.rope_dim)), dim=-1).transpose(1, 2)
        qk_dim = q_BHTK.shape[-1]
        if self.v_dim < qk_dim:  # fused SDPA kernels want one head width: pad V with zeros, slice the output
            v_BTHV = F.pad(v_BTHV, (0, qk_dim - self.v_dim))
        o_BHTV = F.scaled_dot_product_attention(q_BHTK, k_BHTK, v_BTHV.transpose(1, 2), is_causal=True,
                                                scale=self.softmax_scale)
        return o_BHTV.transpose(1, 2)[..., :self.v_dim]

    def _absorbed(self, q_nope_BTHN, q_rope_BTHR, latent_BSC, k_rope_BSR, mask_B1TS) -> torch.Tensor:
        w_HXC = self.wkv_b.weight.view(self.n_heads, self.nope_dim + self.v_dim, self.kv_rank)
        w_uk_HNC, w_uv_HVC = w_HXC.split([self.nope_dim, self.v_dim], dim=1)
        q_lat_BTHC = torch.einsum("bthn,hnc->bthc", q_nope_BTHN, w_uk_HNC)
        scores_BHTS = (torch.einsum("bthc,bsc->bhts", q_lat_BTHC, latent_BSC)
                       + torch.einsum("bthr,bsr->bhts", q_rope_BTHR, k_rope_BSR)).float() * self.softmax_scale
        probs_BHTS = scores_BHTS.masked_fill(~mask_B1TS, float("-inf")).softmax(dim=-1).to(latent_BSC.dtype)
        o_lat_BTHC = torch.einsum("bhts,bsc->bthc", probs_BHTS, latent_BSC)
        return torch.einsum("bthc,hvc->bthv", o_lat_BTHC, w_uv_HVC)
