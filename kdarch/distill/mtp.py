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
A batch that is one part of a larger one (a micro-batch, a data rank's rows) passes `normalisers`, each head's
target count in the whole (`target_counts`, summed over the parts): each head's loss is then its sum over these
rows divided by that count, so the parts' totals add up to the whole batch's, whatever the padding of each part.
With labels the rows whose target lies beyond the sequence (the main head's position T-1, depth k's
position T-1) are excluded; without labels (pure soft KD, α = 1) every row with a teacher row counts
(the main head's T rows, depth k's T - k rows).

Shape legend: B batch, T sequence, D hidden width, V vocabulary, K top-k, X = T - k rows of depth k.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kdarch.checks import check, is_number, number_arg, tensor_arg
from kdarch.config import ModelConfig
from kdarch.distill.head import check_head
from kdarch.distill.losses import KDLossConfig, KDTerms, check_teacher_and_labels, compute, weight_is_finite
from kdarch.distill.teacher_signal import TopKTeacher


@dataclass
class MultiTokenKD:
    """The heads' losses and their combination: backpropagate `total`; the parts are there to log."""
    total: torch.Tensor
    """shares[0] · main.total + mtp_weight · mtp (without MTP heads just the first)."""
    main: KDTerms
    """The main head's loss and terms (soft / hard are None where not computed)."""
    depths: list[KDTerms]
    """Depth k = 1..len(mtp_hidden): each MTP head's loss and terms."""
    mtp: torch.Tensor | None
    """Σ_k w_k · shares[k + 1] · depths[k].total / Σ_k w_k (the model's `mtp_loss` at equal weights, without
    normalisers); None without MTP heads."""
    shares: list[torch.Tensor | float]
    """Per head (main, then depths 1..): its targets here over its normaliser (1 without normalisers): a head's
    mean times its share is its part of the whole batch's mean."""


def target_counts(labels_BT: torch.Tensor, n_depths: int, ignore_index: int = -100) -> torch.Tensor:
    """[2 + n_depths] what a batch's loss terms are normalised by: its rows (per-sequence terms), then the targets of
    the main head and of MTP depths 1..n_depths (position j's head of depth k predicts label j + k + 1, so depth k's
    targets are the labels from position k + 1 on that are not ignored). A tensor: counting on the host would be a
    sync."""
    valid_BT = labels_BT != ignore_index
    rows = torch.tensor(labels_BT.shape[0], device=labels_BT.device)
    return torch.stack([rows] + [valid_BT[:, k + 1:].sum() for k in range(n_depths + 1)])


def _check(main_hidden_BTD, mtp_hidden, weight_VD, labels_BT, teacher, depth_weights, mtp_weight, chunk):
    """Shapes of the heads, weight, labels and teacher (the teacher's signal and the label values are checked
    once, with the loss config, by the caller); returns the normalised depth weights."""
    who = "multi_token_kd_loss"
    tensor_arg(f"{who}: main_hidden", main_hidden_BTD, dim=3, floating=True, what="a float tensor [B, T, D]")
    check_head(who, main_hidden_BTD, weight_VD, chunk, hidden_name="main_hidden")
    B, T, D = main_hidden_BTD.shape
    check(isinstance(mtp_hidden, (list, tuple)), f"{who}: mtp_hidden", "a list of [B, T-k, D] tensors (k = 1, 2, ...)",
          mtp_hidden)
    dtype, device = main_hidden_BTD.dtype, main_hidden_BTD.device
    for k, h in enumerate(mtp_hidden, start=1):
        check(isinstance(h, torch.Tensor) and tuple(h.shape) == (B, T - k, D) and h.dtype == dtype
              and h.device == device, f"{who}: mtp_hidden[{k - 1}]",
              f"depth {k}'s states like main_hidden's: a {str(dtype).removeprefix('torch.')} tensor of shape "
              f"{(B, T - k, D)} on {device}", h)
    lead = tuple(teacher.ids.shape[:-1]) if isinstance(teacher, TopKTeacher) else \
        tuple(teacher.shape[:-1]) if isinstance(teacher, torch.Tensor) and teacher.dim() >= 1 else None
    check(lead is None or lead == (B, T), f"{who}: teacher",
          f"one row per position: rows [B, T] = [{B}, {T}] (logits [B, T, V] or a TopKTeacher [B, T, K])", lead)
    check(labels_BT is None or (isinstance(labels_BT, torch.Tensor) and tuple(labels_BT.shape) == (B, T)),
          f"{who}: labels", f"the input ids [B, T] = [{B}, {T}] (shifted inside) or None", labels_BT)
    number_arg(f"{who}: mtp_weight", mtp_weight, min=0)
    if depth_weights is None:
        return [1.0 / len(mtp_hidden)] * len(mtp_hidden) if mtp_hidden else []
    check(isinstance(depth_weights, Sequence) and len(depth_weights) == len(mtp_hidden)
          and all(is_number(w) and w >= 0 for w in depth_weights) and (not depth_weights or sum(depth_weights) > 0),
          f"{who}: depth_weights", f"{len(mtp_hidden)} finite numbers >= 0 (one per MTP depth) with a positive sum",
          depth_weights)
    return [float(w) / sum(depth_weights) for w in depth_weights]


def multi_token_kd_loss(main_hidden_BTD: torch.Tensor, mtp_hidden: Sequence[torch.Tensor], weight_VD: torch.Tensor,
                        labels_BT: torch.Tensor | None, teacher, *, depth_weights: Sequence[float] | None = None,
                        mtp_weight: float = ModelConfig.mtp_loss_weight, kind: str = "forward_kl",
                        temperature: float = 1.0, alpha: float = 0.5, beta: float = 0.5, ignore_index: int = -100,
                        chunk: int | None = None, return_terms: bool = True,
                        normalisers: torch.Tensor | None = None) -> MultiTokenKD:
    """KD of the main head and every MTP depth against the teacher's distribution for the token each predicts.

    main_hidden [B, T, D] (`out.last_hidden_state`), mtp_hidden [[B, T-k, D] for k = 1..] (`out.mtp_hidden_states`;
    [] for none), weight [V, D] (`model.head.weight`), labels [B, T]: the input ids in the HF convention
    (shifted here; ignore_index marks tokens not to predict) or None (pure soft KD, needs alpha=1), teacher
    [B, T, V] logits or a TopKTeacher [B, T, K] whose row j is the distribution for token j+1.
    depth_weights: relative weights of depths 1..len(mtp_hidden) (default equal); mtp_weight: λ (default
    ModelConfig's 0.3), pass `model.config.mtp_loss_weight` to match the model's loss. kind / temperature / alpha /
    beta / chunk as in `fused_kd_loss`. return_terms=False skips the term α leaves unused (α = 0 or 1; its field
    is then None; for 0 < α < 1 both are None); keep it True to feed `KDSchedule.observe` the soft term.
    normalisers: [1 + len(mtp_hidden)] target counts of the whole batch these rows are part of (main head, then
    depths; `target_counts(...)[1:]` summed over the parts): each head's loss is divided by its count there rather
    than by its own (`MultiTokenKD.shares`); default: each head's mean over its own targets."""
    cfg = KDLossConfig(kind, temperature, alpha, beta, ignore_index)  # validate before any work
    w_depth = _check(main_hidden_BTD, mtp_hidden, weight_VD, labels_BT, teacher, depth_weights, mtp_weight, chunk)
    check(normalisers is None or (isinstance(normalisers, torch.Tensor) and normalisers.dim() == 1
                                  and normalisers.shape[0] >= 1 + len(mtp_hidden)),
          "multi_token_kd_loss: normalisers", f"None or a 1-d tensor of at least {1 + len(mtp_hidden)} target counts "
          f"(the main head's, then each depth's)", normalisers)
    B, T, D = main_hidden_BTD.shape
    if labels_BT is None:
        ignore = -1  # the targets below only mark rows: every position with a student row has a teacher row
        target_BT = torch.zeros(B, T, dtype=torch.long, device=main_hidden_BTD.device)
    else:
        ignore = ignore_index  # position j predicts input_ids[j+1]; position T-1 has no target
        target_BT = torch.cat([labels_BT[:, 1:], labels_BT.new_full((B, 1), ignore_index)], 1)
    # the teacher and the targets are checked once here; every head then runs the fused loss unchecked
    teacher_N, _ = check_teacher_and_labels("multi_token_kd_loss", (B, T), weight_VD.shape[0], main_hidden_BTD.device,
                                            teacher, None if labels_BT is None else target_BT, cfg)
    cfg = KDLossConfig(kind, temperature, alpha, beta, ignore)
    terms = return_terms and labels_BT is not None
    w_finite = weight_is_finite(weight_VD)

    def head(h_BXD: torch.Tensor, k: int) -> KDTerms:
        """Depth k (0: the main head): row i goes to position i + k, positions < k are ignored."""
        if k:
            h_BXD = F.pad(h_BXD, (0, 0, k, 0))
            target_BT_k = target_BT.clone()
            target_BT_k[:, :k] = ignore
        else:
            target_BT_k = target_BT
        res = compute(h_BXD.reshape(-1, D), weight_VD, target_BT_k.reshape(-1), teacher_N, cfg, chunk, terms, w_finite)
        if isinstance(res, KDTerms):
            return res
        n = (target_BT_k != ignore).sum()  # a tensor: counting on the host would be a sync
        return KDTerms(res, res if alpha == 1 else None, res if alpha == 0 else None, n)

    main = head(main_hidden_BTD, 0)
    depths = [head(h, k) for k, h in enumerate(mtp_hidden, start=1)]
    shares = [1.0] * (1 + len(depths)) if normalisers is None else \
        [t.n_tokens / normalisers[k].clamp_min(1) for k, t in enumerate([main, *depths])]
    mtp = sum(w * s * d.total for w, s, d in zip(w_depth, shares[1:], depths)) if depths else None
    main_total = main.total * shares[0]
    return MultiTokenKD(main_total + mtp_weight * mtp if depths else main_total, main, depths, mtp, shares)
