"""The latent KV cache: per token and layer it stores only the normalised KV latent and the roped shared key.

That is kv_lora_rank + qk_rope_head_dim values per token per layer instead of H*(qk_head_dim + v_head_dim)
for a full-head cache: the point of MLA at inference. Slots are shared across the batch (prompts are
left-padded), and `valid` marks which slots hold a real token for each row. Both live side by side in one
preallocated buffer row [latent, k_rope] per slot, written in place, so absorbed attention scores a query
against the whole row in one matmul and a step never copies the cache. Until a padded batch arrives the
mask is only the causal order: `attention_mask` then returns None and a one-token step builds no mask.

`StaticLatentKVCache` is the same cache for a decode step that compiles into one fixed graph (a CUDA graph
under `torch.compile(mode="reduce-overhead")`): the next free slot lives in a device tensor, not a Python
int, new tokens are written with `index_copy_`, and attention always spans all S slots, so no shape or
guard changes from one step to the next and nothing is read back to the host.

Shape legend: L layers, B batch, S cache slots, T new tokens, C kv latent width, R rope width, X = C + R.
"""
from __future__ import annotations

import torch

from kdarch.config import ModelConfig


class LatentKVCache:
    static = False

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int, *, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu", first_layer: int = 0, n_layers: int | None = None):
        """Slots for `max_len` tokens of blocks first_layer .. first_layer + n_layers - 1 (default: the main
        model's blocks; MTP blocks have ids n_layers, n_layers + 1, ...)."""
        if max_len > cfg.max_seq_len:
            raise ValueError(f"LatentKVCache: max_len={max_len} exceeds ModelConfig.max_seq_len={cfg.max_seq_len}")
        n_layers = cfg.n_layers if n_layers is None else n_layers
        self.max_len, self.first_layer = max_len, first_layer
        self.kv_LBSX = torch.zeros(n_layers, batch_size, max_len, cfg.kv_lora_rank + cfg.qk_rope_head_dim,
                                   dtype=dtype, device=device)
        self.latent_LBSC, self.k_rope_LBSR = self.kv_LBSX.split([cfg.kv_lora_rank, cfg.qk_rope_head_dim], dim=-1)
        self.valid_BS = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)
        self.length = 0  # slots filled so far
        self.padded = False  # whether any slot so far was padding: masks are needed from then on
        self._mask = None  # this forward's mask, built by the first layer that asks

    @property
    def batch_size(self) -> int:
        return self.valid_BS.shape[0]

    def nbytes(self) -> int:
        return self.kv_LBSX.nbytes

    def begin(self, valid_BT: torch.Tensor, all_valid: bool = False) -> None:
        """Reserve slots for T new tokens; valid_BT marks which of them are real (not padding). `all_valid`
        says, without reading the tensor, that none is padding."""
        t = valid_BT.shape[1]
        if self.length + t > self.max_len:
            raise ValueError(f"LatentKVCache: {self.length} cached + {t} new tokens exceed max_len={self.max_len}")
        self.valid_BS[:, self.length:self.length + t] = valid_BT
        self.padded = self.padded or not all_valid
        self._mask = None

    def update(self, layer: int, latent_BTC: torch.Tensor, k_rope_BTR: torch.Tensor) -> torch.Tensor:
        """Write the new tokens of one layer in place; return that layer's [B, S, X] rows up to and including
        them (S = length + T)."""
        end, i = self.length + latent_BTC.shape[1], layer - self.first_layer
        self.latent_LBSC[i, :, self.length:end] = latent_BTC
        self.k_rope_LBSR[i, :, self.length:end] = k_rope_BTR
        return self.kv_LBSX[i, :, :end]

    def attention_mask(self, t: int) -> torch.Tensor | None:
        """[B, 1, T, S] bool: query i (slot length+i) sees the valid slots before it and always its own slot
        (so a padding query attends to itself and stays finite instead of softmaxing over nothing). None while
        no slot is padding: the causal order is then the whole rule. Built once per forward."""
        if not self.padded:
            return None
        if self._mask is None:
            end = self.length + t
            self._mask = _mask(torch.arange(self.length, end, device=self.valid_BS.device), self.valid_BS[:, :end])
        return self._mask

    def advance(self, t: int) -> None:
        self.length += t

    def truncate(self, length: int) -> None:
        """Forget every slot from `length` on (e.g. rejected speculative tokens)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"LatentKVCache.truncate: expected 0 <= length <= {self.length}, got {length}")
        self.valid_BS[:, length:] = False
        self.length = length
        self.padded = self.padded and length > 0


class StaticLatentKVCache(LatentKVCache):
    """A LatentKVCache whose step has fixed shapes: forwards on it must pass `position_ids`."""
    static = True

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int, **kwargs):
        super().__init__(cfg, batch_size, max_len, **kwargs)
        self.next_slot = torch.zeros((), dtype=torch.long, device=self.valid_BS.device)
        del self.length  # the host does not know it without a read: next_slot holds it
        for buffer in (self.kv_LBSX, self.valid_BS, self.next_slot):
            torch._dynamo.mark_static_address(buffer)  # mutated in place by a captured graph

    def _new_slots(self, t: int) -> torch.Tensor:
        return self.next_slot + torch.arange(t, device=self.next_slot.device)

    def begin(self, valid_BT: torch.Tensor, all_valid: bool = False) -> None:
        self.valid_BS.index_copy_(1, self._new_slots(valid_BT.shape[1]), valid_BT)

    def update(self, layer: int, latent_BTC: torch.Tensor, k_rope_BTR: torch.Tensor) -> torch.Tensor:
        """Write the new tokens of one layer at the next slots; return the layer's whole [B, S, X] buffer."""
        i, slots_T = layer - self.first_layer, self._new_slots(latent_BTC.shape[1])
        self.latent_LBSC[i].index_copy_(1, slots_T, latent_BTC)
        self.k_rope_LBSR[i].index_copy_(1, slots_T, k_rope_BTR)
        return self.kv_LBSX[i]

    def attention_mask(self, t: int) -> torch.Tensor:
        """[B, 1, T, S] over all S slots, by the rule of LatentKVCache.attention_mask."""
        return _mask(self._new_slots(t), self.valid_BS)

    def advance(self, t: int) -> None:
        self.next_slot.add_(t)

    def truncate(self, length: int) -> None:
        """Forget every slot from `length` on (the host cannot check it against the fill without a read)."""
        if not 0 <= length <= self.max_len:
            raise ValueError(f"StaticLatentKVCache.truncate: expected 0 <= length <= {self.max_len}, got {length}")
        self.valid_BS[:, length:] = False
        self.next_slot.fill_(length)


def _mask(q_slot_T: torch.Tensor, valid_BS: torch.Tensor) -> torch.Tensor:
    """[B, 1, T, S] bool: query slot q sees the valid slots s <= q, and always itself."""
    k_slot_S = torch.arange(valid_BS.shape[1], device=valid_BS.device)
    causal_TS = q_slot_T[:, None] >= k_slot_S[None, :]
    self_TS = q_slot_T[:, None] == k_slot_S[None, :]
    return ((causal_TS[None] & valid_BS[:, None, :]) | self_TS[None])[:, None]
