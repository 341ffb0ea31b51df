"""Feature-based distillation: the student's hidden states learn to match the teacher's, layer pair by layer pair.

Logits tell the student what the teacher concludes; hidden states tell it how the teacher gets there
(FitNets, TinyBERT). Student and teacher differ in width and depth, so each mapped student state goes
through a learned projector to the teacher's width (a bias-free Linear D_s → D_t per pair, trained with the
student: add `distiller.parameters()` to the optimiser), and a layer map pairs student states with teacher
states. Hidden-state indices follow `output_hidden_states=True` in kdarch and Hugging Face alike: index 0
is the embedding output, index i ≥ 1 the output of block i, so a model with L blocks has L + 1 states.

The loss per pair is averaged over valid tokens (bool mask [B, T]) and then over pairs:
    mse     mean over the teacher width of (P h_s − h_t)²
    cosine  1 − cos(P h_s, h_t), blind to the per-token scale of either side
Masked tokens are dropped before the projector, so their values (even NaN) never reach the loss; with no
valid token the loss is 0 (not NaN). The teacher's states are detached: no gradient ever reaches it.

`normalize=True` standardises both sides per token over the width (zero mean, unit variance, no affine)
before the loss. In a pre-norm residual stream the scale of the hidden states grows with depth and a few
channels carry outsized values, so raw MSE is dominated by the deepest pairs and those channels; every
consumer of the stream (the next block, the final norm before the head) sees it through a norm anyway,
so the scale is not the part worth copying.

Shape legend: B batch, T tokens, N valid tokens, S student width, D teacher width.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

LOSSES = ("mse", "cosine")
PROJECTORS = ("linear", "identity")


def uniform_layer_map(n_student: int, n_teacher: int, include_embedding: bool = False) -> tuple[tuple[int, int], ...]:
    """Pairs (student index, teacher index) of hidden states at the same relative depth.

    Student block i (1..n_student) maps to teacher block j(i) = max(1, floor(i · n_teacher / n_student + ½)),
    the nearest block at depth i / n_student (ties go deeper), so the last blocks always pair up:
    4 / 12 → 3, 6, 9, 12; 3 / 4 → 1, 3, 4. The embedding output (index 0) is left out by default: it is a
    context-free per-token lookup, and matching it only copies the teacher's token table through a
    projector. include_embedding=True prepends (0, 0), TinyBERT-style."""
    for name, v in (("n_student", n_student), ("n_teacher", n_teacher)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"uniform_layer_map: {name} must be a number of blocks >= 1, got {v!r}")
    pairs = tuple((i, max(1, (2 * i * n_teacher + n_student) // (2 * n_student))) for i in range(1, n_student + 1))
    return ((0, 0),) + pairs if include_embedding else pairs


@dataclass(frozen=True)
class FeatureKDConfig:
    """What `FeatureDistiller` computes; validated on construction."""
    student_dim: int
    """Width D_s of the student's hidden states."""
    teacher_dim: int
    """Width D_t of the teacher's hidden states."""
    n_student_layers: int
    """Blocks in the student (its hidden-state tuple has n_student_layers + 1 entries)."""
    n_teacher_layers: int
    """Blocks in the teacher (its hidden-state tuple has n_teacher_layers + 1 entries)."""
    layer_map: str | tuple[tuple[int, int], ...] = "uniform"
    """"uniform" (see `uniform_layer_map`) or explicit (student index, teacher index) hidden-state pairs."""
    loss: str = "mse"
    """Per-pair loss: one of LOSSES."""
    projector: str = "linear"
    """"linear" (a Linear D_s → D_t per pair) or "identity" (needs D_s == D_t): one of PROJECTORS."""
    bias: bool = False
    """Give the linear projectors a bias."""
    normalize: bool = False
    """Standardise both sides per token over the width before the loss (see the module docstring)."""
    include_embedding: bool = False
    """With layer_map="uniform", also pair the embedding outputs (index 0)."""

    def __post_init__(self):
        for name in ("student_dim", "teacher_dim", "n_student_layers", "n_teacher_layers"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"FeatureKDConfig.{name} must be an int >= 1, got {v!r}")
        for name, allowed in (("loss", LOSSES), ("projector", PROJECTORS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"FeatureKDConfig.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        for name in ("bias", "normalize", "include_embedding"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"FeatureKDConfig.{name} must be a bool, got {getattr(self, name)!r}")
        if self.projector == "identity" and self.student_dim != self.teacher_dim:
            raise ValueError(f"FeatureKDConfig.projector='identity' needs student_dim == teacher_dim, got "
                             f"{self.student_dim} and {self.teacher_dim}; use projector='linear'")
        if isinstance(self.layer_map, str):
            if self.layer_map != "uniform":
                raise ValueError(f"FeatureKDConfig.layer_map must be 'uniform' or a list of (student index, "
                                 f"teacher index) pairs, got {self.layer_map!r}")
            object.__setattr__(self, "layer_map", uniform_layer_map(self.n_student_layers, self.n_teacher_layers,
                                                                    self.include_embedding))
            return
        if self.include_embedding:
            raise ValueError("FeatureKDConfig.include_embedding applies to layer_map='uniform' only; "
                             "add the pair (0, 0) to an explicit layer_map instead")
        object.__setattr__(self, "layer_map", self._check_pairs(self.layer_map))

    def _check_pairs(self, pairs) -> tuple[tuple[int, int], ...]:
        want = (f"a non-empty list of (student index, teacher index) pairs with student index in "
                f"[0, {self.n_student_layers}] and teacher index in [0, {self.n_teacher_layers}] "
                f"(0: embedding output, i: block i)")
        try:
            out = tuple((s, t) for s, t in pairs)
        except (TypeError, ValueError):
            raise ValueError(f"FeatureKDConfig.layer_map must be {want}, got {pairs!r}") from None
        if not out:
            raise ValueError(f"FeatureKDConfig.layer_map must be {want}, got an empty list")
        for s, t in out:
            if not all(isinstance(v, int) and not isinstance(v, bool) for v in (s, t)) or \
                    not (0 <= s <= self.n_student_layers and 0 <= t <= self.n_teacher_layers):
                raise ValueError(f"FeatureKDConfig.layer_map must be {want}, got the pair {(s, t)!r}")
        if len(set(out)) != len(out):
            dup = next(p for p in out if out.count(p) > 1)
            raise ValueError(f"FeatureKDConfig.layer_map lists the pair {dup} more than once")
        return out


# --------------------------------------------------------------------------------------- shared input checks
def check_states(who: str, side: str, states, count: int | None = None, width: int | None = None) -> tuple[int, int]:
    """Validate a hidden-state sequence (each [B, T, width], one B, T); returns (B, T)."""
    if isinstance(states, torch.Tensor) or not isinstance(states, Sequence) or not states:
        raise ValueError(f"{who}: {side} states must be a non-empty tuple/list of [B, T, D] tensors "
                         f"(e.g. out.hidden_states), got {type(states).__name__}")
    if count is not None and len(states) != count:
        raise ValueError(f"{who}: expected {count} {side} hidden states (embedding output + {count - 1} blocks), "
                         f"got {len(states)}")
    for i, h in enumerate(states):
        if not isinstance(h, torch.Tensor) or not h.is_floating_point() or h.dim() != 3:
            got = f"{h.dtype} {tuple(h.shape)}" if isinstance(h, torch.Tensor) else type(h).__name__
            raise ValueError(f"{who}: {side} state {i} must be a float tensor [B, T, D], got {got}")
        if h.shape[:2] != states[0].shape[:2]:
            raise ValueError(f"{who}: {side} state {i} has [B, T] = {list(h.shape[:2])}, state 0 has "
                             f"{list(states[0].shape[:2])}")
        if width is not None and h.shape[-1] != width:
            raise ValueError(f"{who}: {side} state {i} has width {h.shape[-1]}, expected {width}")
    return tuple(states[0].shape[:2])


def check_state_pair(who: str, student, teacher, counts=(None, None), widths=(None, None)) -> tuple[int, int]:
    """Validate both models' state sequences: same [B, T] and device; returns (B, T)."""
    shape = check_states(who, "student", student, counts[0], widths[0])
    t_shape = check_states(who, "teacher", teacher, counts[1], widths[1])
    if t_shape != shape:
        raise ValueError(f"{who}: student states are [B, T] = {list(shape)}, teacher states {list(t_shape)}")
    if student[0].device != teacher[0].device:
        raise ValueError(f"{who}: student states are on {student[0].device}, teacher states on {teacher[0].device}")
    return shape


def check_mask(who: str, mask, shape: tuple[int, int], device: torch.device) -> torch.Tensor | None:
    """None or a bool [B, T] mask (True = valid token) on the states' device."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != tuple(shape):
        got = f"{mask.dtype} {tuple(mask.shape)}" if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"{who}: mask must be a bool tensor of shape {list(shape)} (True = valid token), got {got}")
    if mask.device != device:
        raise ValueError(f"{who}: mask is on {mask.device}, the states on {device}")
    return mask


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """fp64 if any input is fp64, else fp32: losses are reduced in at least fp32 whatever the model runs in."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def feature_loss(p_ND: torch.Tensor, t_ND: torch.Tensor, loss: str = "mse", normalize: bool = False) -> torch.Tensor:
    """Mean over rows of the per-row loss between projected student features p and teacher features t."""
    if normalize:
        p_ND, t_ND = F.layer_norm(p_ND, p_ND.shape[-1:]), F.layer_norm(t_ND, t_ND.shape[-1:])
    if loss == "mse":
        return (p_ND - t_ND).square().mean()
    return (1 - F.cosine_similarity(p_ND, t_ND, dim=-1, eps=1e-8)).mean()


class FeatureDistiller(nn.Module):
    """Feature KD over mapped hidden-state pairs; forward returns the scalar loss (see the module docstring).

    The teacher side is detached. Projector i (`projectors[i]`, for `config.layer_map[i]`) trains with the
    student. Arguments are the fields of `FeatureKDConfig`."""

    def __init__(self, student_dim: int, teacher_dim: int, n_student_layers: int, n_teacher_layers: int, *,
                 layer_map: str | Sequence[tuple[int, int]] = "uniform", loss: str = "mse", projector: str = "linear",
                 bias: bool = False, normalize: bool = False, include_embedding: bool = False):
        super().__init__()
        self.config = cfg = FeatureKDConfig(student_dim, teacher_dim, n_student_layers, n_teacher_layers, layer_map,
                                            loss, projector, bias, normalize, include_embedding)
        self.projectors = nn.ModuleList(
            nn.Linear(student_dim, teacher_dim, bias=bias) if projector == "linear" else nn.Identity()
            for _ in cfg.layer_map)

    def extra_repr(self) -> str:
        c = self.config
        return f"layer_map={c.layer_map}, loss={c.loss!r}, normalize={c.normalize}"

    def forward(self, student_states: Sequence[torch.Tensor], teacher_states: Sequence[torch.Tensor],
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """student_states / teacher_states: the models' hidden-state tuples (n_layers + 1 tensors [B, T, D_s] /
        [B, T, D_t]); mask: optional bool [B, T], True = valid token. Returns the scalar loss."""
        cfg, who = self.config, "FeatureDistiller"
        shape = check_state_pair(who, student_states, teacher_states, (cfg.n_student_layers + 1,
                                 cfg.n_teacher_layers + 1), (cfg.student_dim, cfg.teacher_dim))
        mask_BT = check_mask(who, mask, shape, student_states[0].device)
        losses = []
        for (s, t), proj in zip(cfg.layer_map, self.projectors):
            h_s, h_t = student_states[s], teacher_states[t].detach()
            h_NS, h_ND = (h_s[mask_BT], h_t[mask_BT]) if mask_BT is not None else (h_s.flatten(0, 1), h_t.flatten(0, 1))
            if h_NS.shape[0] == 0:  # no valid token: 0, still attached to the student's graph
                return h_NS.sum().to(compute_dtype(h_s, h_t)) * 0.0
            w = getattr(proj, "weight", None)
            p_ND = proj(h_NS if w is None else h_NS.to(w.dtype))
            dt = compute_dtype(p_ND, h_ND)
            losses.append(feature_loss(p_ND.to(dt), h_ND.to(dt), cfg.loss, cfg.normalize))
        return torch.stack(losses).mean()
