"""DeepSeekMoE: shared experts plus fine-grained routed experts, with aux-loss-free load balancing.

The router scores experts (sigmoid or softmax), optionally limits each token to its best `topk_group`
groups, and picks the top-k. A per-expert bias is added to the scores *only to choose* experts; the
combine weights come from the unbiased scores. After each optimizer step, `update_bias()` nudges every
bias by gamma*sign(mean load - load), which balances experts without an auxiliary loss gradient. An
optional sequence-wise balance loss is returned for the few cases that still want one. Dispatch is
dropless and goes through `kdarch.ops.moe_ffn`, so kernels can be swapped without touching the model.

Shape legend: B batch, T tokens per sequence, N = B*T tokens, D model width, E routed experts,
K experts per token, G groups, I expert width.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kdarch import ops
from kdarch.config import ModelConfig
from kdarch.model.layers import MLP


class Gate(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.top_k, self.n_group, self.topk_group = cfg.num_experts_per_tok, cfg.n_group, cfg.topk_group
        self.score_func, self.norm_topk_prob = cfg.score_func, cfg.norm_topk_prob
        self.scaling = cfg.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size))
        self.register_buffer("bias", torch.zeros(cfg.n_routed_experts))  # selection-only balancing bias

    def forward(self, x_ND: torch.Tensor):
        """Returns topk_ids [N, K], topk_weights [N, K] fp32, scores [N, E] fp32 (for the balance loss)."""
        logits_NE = F.linear(x_ND.float(), self.weight.float())
        scores_NE = logits_NE.sigmoid() if self.score_func == "sigmoid" else logits_NE.softmax(dim=-1)
        choice_NE = scores_NE.detach() + self.bias
        if self.n_group > 1:
            N, E = choice_NE.shape
            grouped_NGX = choice_NE.view(N, self.n_group, E // self.n_group)
            group_scores_NG = grouped_NGX.topk(min(2, grouped_NGX.shape[-1]), dim=-1).values.sum(dim=-1)
            keep_NG = torch.zeros_like(group_scores_NG, dtype=torch.bool)
            keep_NG.scatter_(1, group_scores_NG.topk(self.topk_group, dim=-1).indices, True)
            choice_NE = grouped_NGX.masked_fill(~keep_NG[..., None], float("-inf")).view(N, E)
        topk_ids_NK = choice_NE.topk(self.top_k, dim=-1).indices
        weights_NK = scores_NE.gather(1, topk_ids_NK)
        if self.norm_topk_prob:
            weights_NK = weights_NK / (weights_NK.sum(dim=-1, keepdim=True) + 1e-20)
        return topk_ids_NK, weights_NK * self.scaling, scores_NE


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        E, D, I = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.n_experts, self.top_k = E, cfg.num_experts_per_tok
        self.bias_update_speed, self.seq_aux_loss_coef = cfg.bias_update_speed, cfg.seq_aux_loss_coef
        self.gate = Gate(cfg)
        self.w_gate_up = nn.Parameter(torch.empty(E, 2 * I, D))  # gate rows, then up rows
        self.w_down = nn.Parameter(torch.empty(E, D, I))
        self.shared = MLP(D, cfg.n_shared_experts * I, cfg.fp8) if cfg.n_shared_experts else None
        self.fp8 = cfg.fp8
        self.register_buffer("tokens_per_expert", torch.zeros(E), persistent=False)  # since the last bias update

    def forward(self, x_BTD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Returns the layer output and, in training with seq_aux_loss_coef > 0, the sequence-wise balance loss."""
        B, T, D = x_BTD.shape
        x_ND = x_BTD.reshape(B * T, D)
        topk_ids_NK, weights_NK, scores_NE = self.gate(x_ND)
        if self.training:
            with torch.no_grad():
                ids_M = topk_ids_NK.flatten()  # a fixed-size scatter: no host sync (bincount needs one on CUDA)
                ones_M = torch.ones_like(ids_M, dtype=self.tokens_per_expert.dtype)
                self.tokens_per_expert.scatter_add_(0, ids_M, ones_M)
        y_ND = self.routed(x_ND, topk_ids_NK, weights_NK)
        if self.shared is not None:
            y_ND = y_ND + self.shared(x_ND)
        aux = None
        if self.training and self.seq_aux_loss_coef > 0:
            aux = self.seq_balance_loss(topk_ids_NK.view(B, T, -1), scores_NE.view(B, T, -1))
        return y_ND.view(B, T, D), aux

    def routed(self, x_ND: torch.Tensor, topk_ids_NK: torch.Tensor, weights_NK: torch.Tensor) -> torch.Tensor:
        """The routed experts' weighted sum per token: where a parallel plan swaps in another dispatch (expert
        parallelism sends the token copies to the ranks holding their experts)."""
        return ops.moe_ffn(x_ND, topk_ids_NK, weights_NK, self.w_gate_up, self.w_down, fp8=self.fp8)

    def seq_balance_loss(self, topk_ids_BTK: torch.Tensor, scores_BTE: torch.Tensor) -> torch.Tensor:
        """alpha * sum_i f_i * P_i per sequence, averaged over the batch (DeepSeek-V3 eq. 17-20)."""
        B, T, K = topk_ids_BTK.shape
        counts_BE = torch.zeros(B, self.n_experts, device=scores_BTE.device)
        counts_BE.scatter_add_(1, topk_ids_BTK.reshape(B, -1), torch.ones(B, T * K, device=scores_BTE.device))
        f_BE = counts_BE * self.n_experts / (K * T)
        p_BE = (scores_BTE / scores_BTE.sum(dim=-1, keepdim=True)).mean(dim=1)
        return self.seq_aux_loss_coef * (f_BE * p_BE).sum(dim=-1).mean()

    @torch.no_grad()
    def update_bias(self) -> torch.Tensor:
        """Aux-loss-free balancing step; returns the per-expert load fraction it acted on, then resets it."""
        load_E = self.tokens_per_expert.clone()
        if self.bias_update_speed > 0:  # no load (a skipped step): sign(0 - 0) = 0, no move; no host read
            self.gate.bias += self.bias_update_speed * torch.sign(load_E.mean() - load_E)
        self.tokens_per_expert.zero_()
        return load_E / load_E.sum().clamp_min(1)
