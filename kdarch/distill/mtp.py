"""MTP-aware distillation: every head of a multi-token-prediction student learns the teacher's distribution
for the token that head predicts.

A kdarch student predicts token j+1 twice over: the main head at position j, and the MTP module of depth k
at its row i = j - k (it sees the tokens up to j and predicts i+k+1 = j+1). The teacher's row j is its
distribution for token j+1, so all heads are compared at the same position j with the same teacher row and
the same label input_ids[j+1]; depth k just has no row at positions j < k. Rather than slicing the teacher
per depth (a [B, T-k, V] copy of a dense teacher whenever B > 1), each depth's hidden states are shifted to
the positions they predict from (a [B, T, D] copy, D << V) and the rows without a student row or a target
carry ignore_index, so the fused head (`fused_kd_loss`) reads the teacher in place and skips those rows.

The combination follows the model's own `mtp_loss_weight` convention (`CausalLM`: lm_loss + λ·mean_k mtp_k):

    total = main + λ · Σ_k w_k · loss_k / Σ_k w_k        (w_k = depth_weights, default equal: the mean)

each head's loss being the α·soft + (1 − α)·hard mean over its own valid rows (kdarch.distill.losses).
With labels the rows whose target lies beyond the sequence (the main head's position T-1, depth k's
position T-1) are excluded; without labels (pure soft KD, α = 1) every row with a teacher row counts
(the main head's T rows, depth k's T - k rows).

Shape legend: B batch, T sequence, D hidden width, V vocabulary, K top-k, X = T - k rows of depth k.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kdarch.config import ModelConfig
from kdarch.distill.head import fused_kd_loss
from kdarch.distill.losses import KDLossConfig, KDTerms
from kdarch.distill.teacher_signal import TopKTeacher, _desc


@dataclass
class MultiTokenKD:
    """The heads' losses and their combination: backpropagate `total`; the parts are there to log."""
    total: torch.Tensor
    """main.total + mtp_weight · mtp (just main.total without MTP heads)."""
    main: KDTerms
    """The main head's loss and terms (soft / hard are None where not computed)."""
    depths: list[KDTerms]
    """Depth k = 1..len(mtp_hidden): each MTP head's loss and terms."""
    mtp: torch.Tensor | None
    """Σ_k w_k · depths[k].total / Σ_k w_k (the model's `mtp_loss` at equal weights); None without MTP heads."""


def _check(main_hidden_BTD, mtp_hidden, labels_BT, teacher, depth_weights, mtp_weight):
    """Shapes of the heads, labels and teacher; returns the normalised depth weights."""
    if not isinstance(main_hidden_BTD, torch.Tensor) or main_hidden_BTD.dim() != 3:
        raise ValueError(f"multi_token_kd_loss: main_hidden must be a tensor [B, T, D], got {_desc(main_hidden_BTD)}")
    B, T, D = main_hidden_BTD.shape
    if not isinstance(mtp_hidden, (list, tuple)):
        raise ValueError(f"multi_token_kd_loss: mtp_hidden must be a list of [B, T-k, D] tensors (k = 1, 2, ...), "
                         f"got {type(mtp_hidden).__name__}")
    for k, h in enumerate(mtp_hidden, start=1):
        if not isinstance(h, torch.Tensor) or tuple(h.shape) != (B, T - k, D):
            raise ValueError(f"multi_token_kd_loss: mtp_hidden[{k - 1}] (depth {k}) must have shape {(B, T - k, D)}, "
                             f"got {_desc(h)}")
    lead = tuple(teacher.ids.shape[:-1]) if isinstance(teacher, TopKTeacher) else \
        tuple(teacher.shape[:-1]) if isinstance(teacher, torch.Tensor) and teacher.dim() >= 1 else None
    if lead is not None and lead != (B, T):
        raise ValueError(f"multi_token_kd_loss: the teacher must have one row per position, [B, T, ...] = "
                         f"[{B}, {T}, ...], got rows {lead}")
    if labels_BT is not None and (not isinstance(labels_BT, torch.Tensor) or tuple(labels_BT.shape) != (B, T)):
        raise ValueError(f"multi_token_kd_loss: labels must be the input ids [B, T] = [{B}, {T}] (shifted inside) or "
                         f"None, got {_desc(labels_BT)}")
    if isinstance(mtp_weight, bool) or not isinstance(mtp_weight, (int, float)) or not math.isfinite(mtp_weight) \
            or mtp_weight < 0:
        raise ValueError(f"multi_token_kd_loss: mtp_weight must be a finite number >= 0, got {mtp_weight!r}")
    if depth_weights is None:
        return [1.0 / len(mtp_hidden)] * len(mtp_hidden) if mtp_hidden else []
    if not isinstance(depth_weights, Sequence) or len(depth_weights) != len(mtp_hidden) or any(
            isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0
            for w in depth_weights) or (depth_weights and sum(depth_weights) <= 0):
        raise ValueError(f"multi_token_kd_loss: depth_weights must be {len(mtp_hidden)} finite numbers >= 0 (one per "
                         f"MTP depth) with a positive sum, got {depth_weights!r}")
    return [float(w) / sum(depth_weights) for w in depth_weights]


def multi_token_kd_loss(main_hidden_BTD: torch.Tensor, mtp_hidden: Sequence[torch.Tensor], weight_VD: torch.Tensor,
                        labels_BT: torch.Tensor | None, teacher, *, depth_weights: Sequence[float] | None = None,
                        mtp_weight: float = ModelConfig.mtp_loss_weight, kind: str = "forward_kl",
                        temperature: float = 1.0, alpha: float = 0.5, beta: float = 0.5, ignore_index: int = -100,
                        chunk: int | None = None, return_terms: bool = True) -> MultiTokenKD:
    """KD of the main head and every MTP depth against the teacher's distribution for the token each predicts.

    main_hidden [B, T, D] (`out.last_hidden_state`), mtp_hidden [[B, T-k, D] for k = 1..] (`out.mtp_hidden_states`;
    [] for none), weight [V, D] (`model.head.weight`), labels [B, T]: the input ids in the HF convention
    (shifted here; ignore_index marks tokens not to predict) or None (pure soft KD, needs alpha=1), teacher
    [B, T, V] logits or a TopKTeacher [B, T, K] whose row j is the distribution for token j+1.
    depth_weights: relative weights of depths 1..len(mtp_hidden) (default equal); mtp_weight: λ (default
    ModelConfig's 0.3), pass `model.config.mtp_loss_weight` to match the model's loss. kind / temperature / alpha /
    beta / chunk as in `fused_kd_loss`. return_terms=False skips the term α leaves unused (α = 0 or 1; its field
    is then None; for 0 < α < 1 both are None); keep it True to feed `KDSchedule.observe` the soft term."""
    KDLossConfig(kind, temperature, alpha, beta, ignore_index)  # validate before any work
    w_depth = _check(main_hidden_BTD, mtp_hidden, labels_BT, teacher, depth_weights, mtp_weight)
    B, T, _ = main_hidden_BTD.shape
    if labels_BT is None:
        if alpha < 1:
            raise ValueError(f"multi_token_kd_loss: the hard-label term (alpha={alpha} < 1) needs labels; pass the "
                             f"input ids as labels or alpha=1")
        ignore = -1  # the targets below only mark rows: every position with a student row has a teacher row
        target_BT = torch.zeros(B, T, dtype=torch.long, device=main_hidden_BTD.device)
    else:
        ignore = ignore_index  # position j predicts input_ids[j+1]; position T-1 has no target
        target_BT = torch.cat([labels_BT[:, 1:], labels_BT.new_full((B, 1), ignore_index)], 1)
    opts = dict(kind=kind, temperature=temperature, alpha=alpha, beta=beta, ignore_index=ignore, chunk=chunk,
                return_terms=return_terms and labels_BT is not None)

    def head(h_BXD: torch.Tensor, k: int) -> KDTerms:
        """Depth k (0: the main head): row i goes to position i + k, positions < k are ignored."""
        if k:
            h_BXD = F.pad(h_BXD, (0, 0, k, 0))
            target_BT_k = target_BT.clone()
            target_BT_k[:, :k] = ignore
        else:
            target_BT_k = target_BT
        res = fused_kd_loss(h_BXD, weight_VD, target_BT_k, teacher, **opts)
        if isinstance(res, KDTerms):
            return res
        n = int((target_BT_k != ignore).sum())
        return KDTerms(res, res if alpha == 1 else None, res if alpha == 0 else None, n)

    main = head(main_hidden_BTD, 0)
    depths = [head(h, k) for k, h in enumerate(mtp_hidden, start=1)]
    mtp = sum(w * d.total for w, d in zip(w_depth, depths)) if depths else None
    return MultiTokenKD(main.total + mtp_weight * mtp if depths else main.total, main, depths, mtp)
