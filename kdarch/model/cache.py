"""The latent KV cache: per token and layer it stores only the normalised KV latent and the roped shared key.

That is kv_lora_rank + qk_rope_head_dim values per token per layer instead of H*(qk_head_dim + v_head_dim)
for a full-head cache: the point of MLA at inference. Slots are shared across the batch (prompts are
left-padded), and `valid` marks which slots hold a real token for each row.

Shape legend: L layers, B batch, S cache slots, T new tokens, C kv latent width, R rope width.
"""
from __future__ import annotations

import torch

from kdarch.config import ModelConfig


class LatentKVCache:
    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int, *, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu", first_layer: int = 0, n_layers: int | None = None):
        """Slots for `max_len` tokens of blocks first_layer .. first_layer + n_layers - 1 (default: the main
        model's blocks; MTP blocks have ids n_layers, n_layers + 1, ...)."""
        if max_len > cfg.max_seq_len:
            raise ValueError(f"LatentKVCache: max_len={max_len} exceeds ModelConfig.max_seq_len={cfg.max_seq_len}")
        n_layers = cfg.n_layers if n_layers is None else n_layers
        self.max_len, self.first_layer = max_len, first_layer
        self.latent_LBSC = torch.zeros(n_layers, batch_size, max_len, cfg.kv_lora_rank, dtype=dtype, device=device)
        self.k_rope_LBSR = torch.zeros(n_layers, batch_size, max_len, cfg.qk_rope_head_dim, dtype=dtype,
                                       device=device)
        self.valid_BS = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)
        self.length = 0  # slots filled so far

    @property
    def batch_size(self) -> int:
        return self.valid_BS.shape[0]

    def nbytes(self) -> int:
        return self.latent_LBSC.nbytes + self.k_rope_LBSR.nbytes

    def begin(self, valid_BT: torch.Tensor) -> None:
        """Reserve slots for T new tokens; valid_BT marks which of them are real (not padding)."""
        t = valid_BT.shape[1]
        if self.length + t > self.max_len:
            raise ValueError(f"LatentKVCache: {self.length} cached + {t} new tokens exceed max_len={self.max_len}")
        self.valid_BS[:, self.length:self.length + t] = valid_BT

    def update(self, layer: int, latent_BTC: torch.Tensor, k_rope_BTR: torch.Tensor):
        """Write the new tokens of one layer; return that layer's cache up to and including them."""
        end, i = self.length + latent_BTC.shape[1], layer - self.first_layer
        self.latent_LBSC[i, :, self.length:end] = latent_BTC
        self.k_rope_LBSR[i, :, self.length:end] = k_rope_BTR
        return self.latent_LBSC[i, :, :end], self.k_rope_LBSR[i, :, :end]

    def attention_mask(self, t: int) -> torch.Tensor:
        """[B, 1, T, S] bool: query i (slot length+i) sees the valid slots before it and always its own slot
        (so a padding query attends to itself and stays finite instead of softmaxing over nothing)."""
        end = self.length + t
        q_slot_T = torch.arange(self.length, end, device=self.valid_BS.device)
        k_slot_S = torch.arange(end, device=self.valid_BS.device)
        causal_TS = q_slot_T[:, None] >= k_slot_S[None, :]
        self_TS = q_slot_T[:, None] == k_slot_S[None, :]
        return ((causal_TS[None] & self.valid_BS[:, None, :end]) | self_TS[None])[:, None]

    def advance(self, t: int) -> None:
        self.length += t

    def truncate(self, length: int) -> None:
        """Forget every slot from `length` on (e.g. rejected speculative tokens)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"LatentKVCache.truncate: expected 0 <= length <= {self.length}, got {length}")
        self.valid_BS[:, length:] = False
        self.length = length
