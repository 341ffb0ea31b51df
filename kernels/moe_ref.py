"""Plain fp32 references for the MoE expert op and its routing metadata.

Every MoE backend (torch grouped GEMM, Triton) is tested and benchmarked against these
two functions, so they favour being obviously right over being fast: a Python loop over
experts, fp32 everywhere, no permutation tricks.

Legend: T tokens, K experts per token (top-k), E experts, H hidden, I expert intermediate,
M = T*K routed rows (one per (token, slot) pair, flattened slot index m = t*K + k).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def routing_metadata_ref(topk_ids_TK: torch.Tensor, n_experts: int):
    """Group the T*K (token, slot) pairs by expert, keeping token order inside each expert.

    Returns (counts_E, offsets_E1, sorted_idx_M, inv_idx_M), all int64:
      counts_E[e]        rows routed to expert e
      offsets_E1         [0, cumsum(counts)]: expert e owns sorted rows offsets[e]:offsets[e+1]
      sorted_idx_M[j]    flattened slot index (t*K + k) of the j-th row in expert order
      inv_idx_M[m]       position of slot m in expert order (sorted_idx_M[inv_idx_M] == arange)
    """
    ids_M = topk_ids_TK.reshape(-1).long().cpu()
    counts, rows = [], []
    for e in range(n_experts):
        idx = (ids_M == e).nonzero().flatten()  # ascending slot order = stable
        counts.append(idx.numel())
        rows.append(idx)
    dev = topk_ids_TK.device
    counts_E = torch.tensor(counts, dtype=torch.int64)
    offsets_E1 = torch.cat([torch.zeros(1, dtype=torch.int64), counts_E.cumsum(0)])
    sorted_idx_M = torch.cat(rows) if rows else torch.zeros(0, dtype=torch.int64)
    inv_idx_M = torch.empty_like(sorted_idx_M)
    inv_idx_M[sorted_idx_M] = torch.arange(sorted_idx_M.numel())
    return counts_E.to(dev), offsets_E1.to(dev), sorted_idx_M.to(dev), inv_idx_M.to(dev)


def moe_ffn_ref(x_TH, topk_ids_TK, topk_weights_TK, w_gate_up_E2IH, w_down_EHI):
    """out[t] = sum_k w[t,k] * down_e(silu(gate_e x_t) * up_e x_t), e = topk_ids[t,k]; in fp32.

    Differentiable (autograd through plain torch ops); returns fp32 [T, H].
    """
    x = x_TH.float()
    w = topk_weights_TK.float()
    I = w_down_EHI.shape[-1]
    out_TH = torch.zeros_like(x)
    for e in range(w_gate_up_E2IH.shape[0]):
        t_idx, k_idx = (topk_ids_TK == e).nonzero(as_tuple=True)
        if t_idx.numel() == 0:
            continue
        h = x[t_idx] @ w_gate_up_E2IH[e].float().T  # [n, 2I]
        a = F.silu(h[:, :I]) * h[:, I:]
        y = a @ w_down_EHI[e].float().T  # [n, H]
        out_TH = out_TH.index_add(0, t_idx, y * w[t_idx, k_idx, None])
    return out_TH
