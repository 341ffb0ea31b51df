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

from kdarch.checks import bool_arg, check, choice_arg, fail, int_arg, is_int, tensor_arg

LOSSES = ("mse", "cosine")
PROJECTORS = ("linear", "identity")


def uniform_layer_map(n_student: int, n_teacher: int, include_embedding: bool = False) -> tuple[tuple[int, int], ...]:
    """Pairs (student index, teacher index) of hidden states at the same relative depth.

    Student block i (1..n_student) maps to teacher block j(i) = max(1, floor(i · n_teacher / n_student + ½)),
    the nearest block at depth i / n_student (ties go deeper), so the last blocks always pair up:
    4 / 12 → 3, 6, 9, 12; 3 / 4 → 1, 3, 4. The embedding output (index 0) is left out by default: it is a
    context-free per-token lookup, and matching it only copies the teacher's token table through a
    projector. include_embedding=True prepends (0, 0), TinyBERT-style."""
    int_arg("uniform_layer_map: n_student", n_student, min=1)
    int_arg("uniform_layer_map: n_teacher", n_teacher, min=1)
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
            int_arg(f"FeatureKDConfig.{name}", getattr(self, name), min=1)
        choice_arg("FeatureKDConfig.loss", self.loss, LOSSES)
        choice_arg("FeatureKDConfig.projector", self.projector, PROJECTORS)
        for name in ("bias", "normalize", "include_embedding"):
            bool_arg(f"FeatureKDConfig.{name}", getattr(self, name))
        check(self.projector == "linear" or self.student_dim == self.teacher_dim, "FeatureKDConfig.projector",
              f"'linear' for student_dim={self.student_dim} != teacher_dim={self.teacher_dim} ('identity' needs "
              f"equal widths)", self.projector)
        if isinstance(self.layer_map, str):
            check(self.layer_map == "uniform", "FeatureKDConfig.layer_map",
                  "'uniform' or a list of (student index, teacher index) pairs", self.layer_map)
            object.__setattr__(self, "layer_map", uniform_layer_map(self.n_student_layers, self.n_teacher_layers,
                                                                    self.include_embedding))
            return
        check(not self.include_embedding, "FeatureKDConfig.include_embedding",
              "False with an explicit layer_map (it applies to layer_map='uniform' only; add the pair (0, 0) to "
              "the map instead)", self.include_embedding)
        object.__setattr__(self, "layer_map", self._check_pairs(self.layer_map))

    def _check_pairs(self, pairs) -> tuple[tuple[int, int], ...]:
        name, ns, nt = "FeatureKDConfig.layer_map", self.n_student_layers, self.n_teacher_layers
        pair = (f"a (student index, teacher index) pair of ints, student index in [0, {ns}] and teacher index in "
                f"[0, {nt}] (0: embedding output, i: block i)")
        try:
            items = list(pairs)
        except TypeError:
            items = []
        check(bool(items), name, f"'uniform' or a non-empty list of pairs, each {pair}", pairs)
        out: list[tuple[int, int]] = []
        for i, p in enumerate(items):
            ok = isinstance(p, (tuple, list)) and len(p) == 2 and all(is_int(v) for v in p) and \
                0 <= p[0] <= ns and 0 <= p[1] <= nt
            check(ok, f"{name}[{i}]", pair, p)
            if tuple(p) in out:
                fail(f"{name}[{i}]", f"a pair not listed before ({name}[{out.index(tuple(p))}] is the same)", p)
            out.append(tuple(p))
        return tuple(out)


# --------------------------------------------------------------------------------------- shared input checks
def check_states(who: str, side: str, states, count: int | None = None, width: int | None = None) -> tuple[int, int]:
    """Validate a hidden-state sequence (each [B, T, width], one B, T); returns (B, T)."""
    name = f"{who}: {side} states"
    check(not isinstance(states, torch.Tensor) and isinstance(states, Sequence) and len(states) > 0, name,
          "a non-empty tuple/list of [B, T, D] tensors (e.g. out.hidden_states)", states)
    check(count is None or len(states) == count, name,
          f"{count} hidden states (embedding output + {(count or 1) - 1} blocks)", len(states))
    for i, h in enumerate(states):
        tensor_arg(f"{name}[{i}]", h, dim=3, floating=True, what="a float tensor [B, T, D]")
        check(h.shape[:2] == states[0].shape[:2], f"{name}[{i}]",
              f"[B, T] = {list(states[0].shape[:2])} like {side} states[0]", h)
        check(width is None or h.shape[-1] == width, f"{name}[{i}]", f"a tensor of width D = {width}", h)
    return tuple(states[0].shape[:2])


def check_state_pair(who: str, student, teacher, counts=(None, None), widths=(None, None)) -> tuple[int, int]:
    """Validate both models' state sequences: same [B, T] and device; returns (B, T)."""
    shape = check_states(who, "student", student, counts[0], widths[0])
    t_shape = check_states(who, "teacher", teacher, counts[1], widths[1])
    check(t_shape == shape, f"{who}: teacher states", f"[B, T] = {list(shape)} like the student states", teacher[0])
    check(teacher[0].device == student[0].device, f"{who}: teacher states",
          f"tensors on the student states' device ({student[0].device})", teacher[0].device)
    return shape


def check_mask(who: str, mask, shape: tuple[int, int], device: torch.device) -> torch.Tensor | None:
    """None or a bool [B, T] mask (True = valid token) on the states' device."""
    if mask is None:
        return None
    tensor_arg(f"{who}: mask", mask, dtypes=(torch.bool,), shape=tuple(shape),
               what=f"a bool tensor of shape {list(shape)} (True = valid token)")
    check(mask.device == device, f"{who}: mask", f"a tensor on the states' device ({device})", mask.device)
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
