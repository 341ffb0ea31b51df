"""Multi-head latent attention (MLA), DeepSeek-V2/V3 style.

Keys and values of all heads are up-projected from one small per-token latent, plus one rope key shared
by every head. The cache keeps only [latent, k_rope] per token; attention over it runs one of two exact paths:
- expanded: up-project the latents to per-head K and V and run PyTorch's fused SDPA. Compute-bound
  work (training, the no-cache forward, prefill) takes it: SDPA never materialises the scores;
- absorbed: fold the key up-projection into the query (scores = (q_nope W_uk) . latent + q_rope . k_rope)
  and the value up-projection into the output ((p . latent) W_uv). Nothing per head is ever built from the
  cache, so a decode step reads C + R values per cached token instead of H * (N + R + V).
`choose_path` picks per call from the shapes (FLOPs of each path; a one-token step is always absorbed:
expanding S latents costs more than attending to them); `set_path` pins one path for tests and benchmarks.
Absorbed attention is multi-query attention with the heads as query rows: one bmm over the batch against
the [S, C + R] cache rows, no per-head copies and no fp32 copy of the cache.

Shape legend: B batch, T query tokens, S key tokens, H heads, D model width, C kv latent width,
N qk nope width, R rope width, V value width, X = C + R (a cache row), U = N + V (one head's rows of wkv_b),
O = H * V, M = B * T, L = T * H.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from kdarch.config import ModelConfig
from kdarch.model.cache import LatentKVCache
from kdarch.model.layers import RMSNorm, apply_rope, linear

LATENT_NORM_EPS = 1e-6  # the q / kv latent norms use DeepSeek-V3's fixed eps, whatever rms_norm_eps is
PATHS = ("auto", "absorbed", "expanded")
"""Cached attention paths: `auto` chooses per call (`choose_path`); the default is $KDARCH_MLA_PATH or auto."""


def _check_path(path: str) -> str:
    if path not in PATHS:
        raise ValueError(f"MLA path: expected one of {', '.join(PATHS)}, got {path!r}")
    return path


def choose_path(T: int, S: int, cfg: ModelConfig) -> str:
    """The cheaper path for T queries against S cached tokens, by FLOPs per layer (q and output projections,
    common to both, left out). Absorbed: the q and output absorption plus scores and values against the
    latent; expanded: up-projecting S latents plus full-head scores and values."""
    H, N, R, V, C = cfg.n_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
    absorbed = T * H * (N * C + C * V + S * (2 * C + R))
    expanded = S * C * H * (N + V) + T * H * S * (N + R + V)
    return "absorbed" if absorbed <= expanded else "expanded"


def set_path(model: nn.Module, path: str) -> None:
    """Pin the cached-attention path of every MLA in `model` ("auto" restores the choice per call)."""
    _check_path(path)
    for m in model.modules():
        if isinstance(m, MLA):
            m.path = path


def _causal_TS(T: int, S: int, device) -> torch.Tensor:
    """[T, S] bool: the T queries sit at the last T of S slots and see every slot up to their own."""
    return torch.ones(T, S, dtype=torch.bool, device=device).tril(S - T)


class MLA(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.n_heads = cfg.n_heads
        self.nope_dim, self.rope_dim, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.kv_rank = cfg.kv_lora_rank
        self.softmax_scale = cfg.softmax_scale
        self.path = _check_path(os.environ.get("KDARCH_MLA_PATH", "auto"))
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
            return self.wo(self._expanded(q_BTHK, latent_BTC, k_rope_BTR, None))
        kv_BSX = cache.update(layer_id, latent_BTC, k_rope_BTR)
        mask_B1TS = cache.attention_mask(T)  # None: no padding, causal order is the only rule
        S = kv_BSX.shape[1]
        path = choose_path(T, S, self.cfg) if self.path == "auto" else self.path
        if path == "absorbed":
            if mask_B1TS is None and T > 1:
                mask_B1TS = _causal_TS(T, S, x_BTD.device)[None, None]
            o_BTO = self._absorbed(q_BTHK, kv_BSX, mask_B1TS)
        else:
            if mask_B1TS is None and T < S:
                mask_B1TS = _causal_TS(T, S, x_BTD.device)[None, None]
            o_BTO = self._expanded(q_BTHK, kv_BSX[..., :self.kv_rank], kv_BSX[..., self.kv_rank:], mask_B1TS)
        return self.wo(o_BTO)

    def _expanded(self, q_BTHK, latent_BSC, k_rope_BSR, mask_B1TS) -> torch.Tensor:
        """Full-head SDPA on up-projected latents; mask None = causal with T == S. Returns [B, T, H * V]."""
        B, S, _ = latent_BSC.shape
        T, H = q_BTHK.shape[1], self.n_heads
        k_nope_BSHN, v_BSHV = self.wkv_b(latent_BSC).view(B, S, H, -1).split([self.nope_dim, self.v_dim], dim=-1)
        k_BHSK = torch.cat((k_nope_BSHN, k_rope_BSR[:, :, None].expand(B, S, H, self.rope_dim)), -1).transpose(1, 2)
        qk_dim = q_BTHK.shape[-1]
        if self.v_dim < qk_dim:  # fused SDPA kernels want one head width: pad V with zeros, slice the output
            v_BSHV = F.pad(v_BSHV, (0, qk_dim - self.v_dim))
        o_BHTV = F.scaled_dot_product_attention(q_BTHK.transpose(1, 2), k_BHSK, v_BSHV.transpose(1, 2),
                                                attn_mask=mask_B1TS, is_causal=mask_B1TS is None,
                                                scale=self.softmax_scale)
        return o_BHTV.transpose(1, 2)[..., :self.v_dim].reshape(B, T, H * self.v_dim)

    def _absorbed(self, q_BTHK, kv_BSX, mask_B1TS) -> torch.Tensor:
        """Attention against the latent cache with W_uk folded into q and W_uv into the output. [B, T, H * V]"""
        B, T, H, _ = q_BTHK.shape
        N, C = self.nope_dim, self.kv_rank
        w_HUC = self.wkv_b.weight.view(H, N + self.v_dim, C)
        q_nope_HMN = q_BTHK[..., :N].reshape(B * T, H, N).transpose(0, 1)
        q_lat_MHC = torch.bmm(q_nope_HMN, w_HUC[:, :N]).transpose(0, 1)                 # W_uk folded into q
        q_BLX = torch.cat((q_lat_MHC.reshape(B, T * H, C), q_BTHK[..., N:].reshape(B, T * H, -1)), -1)
        scores_BLS = torch.bmm(q_BLX.mul_(self.softmax_scale), kv_BSX.transpose(1, 2))  # heads as query rows
        if mask_B1TS is not None:
            scores_BTHS = scores_BLS.view(B, T, H, -1)
            scores_BTHS.masked_fill_(mask_B1TS.transpose(1, 2).logical_not(), float("-inf"))
        probs_BLS = scores_BLS.float().softmax(dim=-1).to(kv_BSX.dtype)
        o_lat_HMC = torch.bmm(probs_BLS, kv_BSX[..., :C]).view(B * T, H, C).transpose(0, 1)
        o_HMV = torch.bmm(o_lat_HMC, w_HUC[:, N:].transpose(1, 2))                     # W_uv folded into the output
        return o_HMV.transpose(0, 1).reshape(B, T, H * self.v_dim)
