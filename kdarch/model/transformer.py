"""The kdarch causal LM: embedding -> blocks (MLA + dense MLP or MoE) -> norm -> head, plus MTP modules.

MTP module k (1..D) combines the previous depth's hidden state at position i with the embedding of token
i+k through a 2D->D projection, runs one transformer block and the shared output head, and so predicts
token i+k+1. Its cross-entropy, averaged over depths and weighted by lambda, joins the main loss during
training; at inference the modules can draft tokens.

Shape legend: B batch, T tokens, D model width, V vocabulary.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from kdarch.checks import check_index_range, fail, tensor_arg
from kdarch.config import ModelConfig
from kdarch.model.attention import MLA
from kdarch.model.cache import LatentKVCache
from kdarch.model.generation import generate
from kdarch.model.layers import MLP, RMSNorm, linear, rope_table
from kdarch.model.moe import MoE
from kdarch.ops.linear_ce import linear_cross_entropy


@dataclass
class CausalLMOutput:
    logits: torch.Tensor | None
    """[B, T, V] next-token logits (None with labels and return_logits=False)."""
    loss: torch.Tensor | None = None
    """lm_loss + mtp_loss_weight * mtp_loss + balance_loss, when labels are given."""
    lm_loss: torch.Tensor | None = None
    mtp_loss: torch.Tensor | None = None
    """Mean over MTP depths of their cross-entropies."""
    mtp_losses: list[torch.Tensor] | None = None
    """Per MTP depth: its cross-entropy, a mean over its own targets (a trainer that splits a batch weighs each by
    its share of that depth's targets)."""
    balance_loss: torch.Tensor | None = None
    """Sum over MoE layers of the sequence-wise balance loss (training, seq_aux_loss_coef > 0)."""
    last_hidden_state: torch.Tensor | None = None
    """[B, T, D] final-normed hidden states: what the output head sees."""
    hidden_states: tuple[torch.Tensor, ...] | None = None
    """Embedding output and every block's output, each [B, T, D] (on request)."""
    mtp_logits: list[torch.Tensor] | None = None
    """Per MTP depth k: [B, T-k, V], position i predicting token i+k+1 (on request or with labels)."""
    mtp_hidden_states: list[torch.Tensor] | None = None
    """Per MTP depth k: [B, T-k, D] final-normed hidden states, what the head sees (on request)."""


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn = MLA(cfg)
        self.ffn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.ffn = MoE(cfg) if cfg.is_moe_layer(layer_id) else MLP(cfg.hidden_size, cfg.intermediate_size, cfg.fp8)

    def forward(self, x, cos, sin, cache: LatentKVCache | None = None):
        x = x + self.attn(self.attn_norm(x), cos, sin, self.layer_id, cache)
        if isinstance(self.ffn, MoE):
            y, aux = self.ffn(self.ffn_norm(x))
            return x + y, aux
        return x + self.ffn(self.ffn_norm(x)), None


class MTPModule(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        self.enorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.eh_proj = linear(2 * cfg.hidden_size, cfg.hidden_size, cfg.fp8)  # acts on [enorm(e); hnorm(h)]
        self.block = Block(cfg, layer_id)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, h_prev, emb, cos, sin, cache: LatentKVCache | None = None):
        """h_prev [B, T, D]: the previous depth's hidden states at positions i; emb: embeddings of tokens i+k.
        Returns this depth's hidden states, their final-normed version (for the head) and the balance loss."""
        h = self.eh_proj(torch.cat((self.enorm(emb), self.hnorm(h_prev)), dim=-1))
        h, aux = self.block(h, cos, sin, cache)
        return h, self.norm(h), aux


class CausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.head.weight = self.embed.weight
        self.mtp = nn.ModuleList(MTPModule(cfg, cfg.n_layers + k) for k in range(cfg.n_mtp_modules))
        self.register_buffer("rope_cos", torch.empty(cfg.max_seq_len, cfg.qk_rope_head_dim // 2), persistent=False)
        self.register_buffer("rope_sin", torch.empty(cfg.max_seq_len, cfg.qk_rope_head_dim // 2), persistent=False)
        self.reset_parameters()

    @torch.no_grad()
    def init_buffers(self) -> None:
        """Recompute the non-persistent buffers (rope tables, load counters), e.g. after meta-device init."""
        cos, sin = rope_table(self.config)
        self.rope_cos.copy_(cos)
        self.rope_sin.copy_(sin)
        for moe in self.moe_layers():
            moe.tokens_per_expert.zero_()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        std = self.config.init_std
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, std)
        for moe in self.moe_layers():
            moe.gate.bias.zero_()
        self.init_buffers()

    def generate(self, prompts, max_new_tokens: int, **sampling) -> list[list[int]]:
        """See `kdarch.model.generation.generate`."""
        return generate(self, prompts, max_new_tokens, **sampling)

    # --- MoE helpers ----------------------------------------------------------------------------
    def moe_layers(self) -> list[MoE]:
        return [m for m in self.modules() if isinstance(m, MoE)]

    def update_router_biases(self) -> dict[str, torch.Tensor]:
        """Aux-loss-free balancing step for every MoE layer (call after optimizer.step()).
        Returns each layer's per-expert load fraction since the previous call, keyed by module name."""
        return {name: m.update_bias() for name, m in self.named_modules() if isinstance(m, MoE)}

    def attach_bias_update(self, optimizer: torch.optim.Optimizer):
        """Run `update_router_biases` automatically after every `optimizer.step()`; returns the hook handle."""
        return optimizer.register_step_post_hook(lambda *_: self.update_router_biases())

    # --- forward --------------------------------------------------------------------------------
    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def _check_ids(self, name: str, ids: torch.Tensor, allow_ignore: bool = False) -> None:
        """Shape and dtype always; the id range only where value checks are on (kdarch.checks)."""
        tensor_arg(name, ids, dim=2, dtypes=(torch.int64, torch.int32), what="an int64/int32 tensor [batch, seq_len]")
        if ids.numel() == 0:
            fail(name, "at least one token", ids)
        check_index_range(name, ids, self.config.vocab_size, ignore=-100 if allow_ignore else None,
                          what="token ids")

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None, *,
                output_hidden_states: bool = False, output_mtp_logits: bool = False,
                output_mtp_hidden_states: bool = False, cache: LatentKVCache | None = None,
                position_ids: torch.Tensor | None = None,
                valid_mask: torch.Tensor | None = None, return_logits: bool = True) -> CausalLMOutput:
        """Full causal forward. With `labels` (HF convention: labels are the input ids; the shift happens
        here; -100 is ignored) it returns the losses, computed by a fused chunked head that never keeps
        [B*T, V] logits for backward; the returned logits then carry no autograd history, and
        `return_logits=False` skips them (also without labels: a distillation head then works from
        `last_hidden_state` / `mtp_hidden_states`). With `cache` it attends over the latent cache, appending these
        tokens at `position_ids` ([B, T]; `valid_mask` marks non-padding tokens)."""
        self._check_ids("input_ids", input_ids)
        B, T = input_ids.shape
        if cache is not None and cache.static:  # slots and positions live on the device: nothing to read here
            if position_ids is None:
                raise ValueError("position_ids: expected a [batch, seq_len] tensor with a StaticLatentKVCache")
            start = 0
        else:
            start = cache.length if cache is not None else 0
            if start + T > self.config.max_seq_len:
                raise ValueError(f"input_ids: {start + T} tokens exceed ModelConfig.max_seq_len="
                                 f"{self.config.max_seq_len}")
        if labels is not None:
            self._check_ids("labels", labels, allow_ignore=True)
            if labels.shape != input_ids.shape:
                raise ValueError(f"labels: expected shape {tuple(input_ids.shape)} like input_ids, got "
                                 f"{tuple(labels.shape)}")
        if position_ids is None:
            position_ids = torch.arange(start, start + T, device=input_ids.device)
        cos, sin = self.rope_cos[position_ids], self.rope_sin[position_ids]
        if cache is not None:
            all_valid = valid_mask is None
            cache.begin(torch.ones(B, T, dtype=torch.bool, device=input_ids.device) if all_valid else valid_mask,
                        all_valid=all_valid)

        x = self.embed(input_ids)
        hidden = [x] if output_hidden_states else None
        aux_losses = []
        for block in self.layers:
            x, aux = block(x, cos, sin, cache)
            if aux is not None:
                aux_losses.append(aux)
            if hidden is not None:
                hidden.append(x)
        if cache is not None:
            cache.advance(T)
        h = self.norm(x)
        out = CausalLMOutput(logits=None, last_hidden_state=h,
                             hidden_states=tuple(hidden) if hidden is not None else None)
        out.lm_loss, out.logits = self._head(h, labels, 1, return_logits)

        want_mtp = labels is not None or output_mtp_logits or output_mtp_hidden_states
        if self.mtp and want_mtp and cache is None:
            out.mtp_logits, mtp_losses = [], []
            out.mtp_hidden_states = [] if output_mtp_hidden_states else None
            h_prev = h
            for k, module in enumerate(self.mtp, start=1):
                if T - k < 1:
                    break
                emb = self.embed(input_ids[:, k:])
                h_prev, h_normed, aux = module(h_prev[:, :T - k], emb, cos[..., :T - k, :], sin[..., :T - k, :])
                if out.mtp_hidden_states is not None:
                    out.mtp_hidden_states.append(h_normed)
                loss_k, logits_k = self._head(h_normed, labels, k + 1, output_mtp_logits or
                                              (return_logits and not output_mtp_hidden_states))
                out.mtp_logits.append(logits_k)
                mtp_losses.append(loss_k)
                if aux is not None:
                    aux_losses.append(aux)
            if labels is not None and mtp_losses:
                out.mtp_losses, out.mtp_loss = mtp_losses, torch.stack(mtp_losses).mean()
        if aux_losses:
            out.balance_loss = torch.stack(aux_losses).sum()
        if labels is not None:
            out.loss = out.lm_loss
            if out.mtp_loss is not None:
                out.loss = out.loss + self.config.mtp_loss_weight * out.mtp_loss
            if out.balance_loss is not None:
                out.loss = out.loss + out.balance_loss
        return out

    def _head(self, h_BXD: torch.Tensor, labels_BT: torch.Tensor | None, shift: int, return_logits: bool):
        """(loss, logits) of the output head on hidden states h (X <= T positions), position i predicting
        labels[i + shift]. Without labels: (None, differentiable logits). With labels the loss runs through
        the fused chunked head and the logits, if returned, carry no autograd history."""
        if labels_BT is None:
            return None, self.head(h_BXD) if return_logits else None
        B, X, D = h_BXD.shape
        target_BX = labels_BT.new_full((B, X), -100)
        n = labels_BT.shape[1] - shift
        if n > 0:
            target_BX[:, :n] = labels_BT[:, shift:shift + n]
        res = linear_cross_entropy(h_BXD.reshape(B * X, D), self.head.weight, target_BX.reshape(-1),
                                   return_logits=return_logits)
        return (res[0], res[1].view(B, X, -1)) if return_logits else (res, None)
