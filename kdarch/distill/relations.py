"""Relation-based distillation: the student copies how the teacher's representations relate to each other.

Feature KD needs a projector because the widths differ; relations do not: a distance, an angle or a
similarity between two points is a number whatever the width, so a narrow student can match the geometry
of a wide teacher directly. Three losses on student points [N, S] vs teacher points [N, D] (teacher detached):

    rkd_distance_loss           RKD-D (Park et al. 2019): ψ_ij = ‖x_i − x_j‖ / mean over distinct pairs i < j;
                                smooth-L1 (δ = 1) between the student's and the teacher's ψ, mean over pairs.
                                Invariant to translating, rotating and scaling either side.
    rkd_angle_loss              RKD-A: for every ordered triplet of distinct points with apex j,
                                cos∠(x_i − x_j, x_k − x_j); smooth-L1, mean over the N(N−1)(N−2) triplets.
                                Same invariances. O(N³ + N²·width) time and memory, so N is capped (max_n,
                                default 128; the module subsamples, the function refuses).
    similarity_preserving_loss  SP (Tung & Mori 2019): G = F Fᵀ with every row L2-normalised;
                                ‖G_s − G_t‖²_F / N². Invariant to scaling or rotating either side.

The cosines come from the differences themselves: u_ji = (x_i − x_j) / ‖x_i − x_j‖, cos = u_ji · u_jk, one
[N, N, width] tensor of differences (N = 128 points of width 4096: 256 MiB in fp32). The Gram-matrix form,
(x_i − x_j)·(x_k − x_j) = G_ik − G_ij − G_jk + G_jj, would need only O(N·width), but its terms cancel when two
points are close relative to the spread of the set, e.g. an outlier token with huge activations (an attention
sink) beside near-duplicates, common with over="tokens": in fp32 it was off by 17–160% in value and up to 100%
in gradient, and fp64 only moves the threshold. A difference of two floats is exact to its own rounding
however close they are, so the directions are too.
An angle at a point that coincides with the apex counts as cos = 0 (a zero-length side has no direction).

`RelationDistiller` applies one loss to [B, T, width] states: over="samples" relates the sequences of a
batch (one point per sequence: the mean of its valid tokens); over="tokens" relates the valid tokens of
each sequence and averages over sequences. The states are the hidden-state tuples of the two models or
their MLA latents, captured by `capture_mla_latents`: the latent is what the inference cache stores per
token, so matching its geometry aims the student's compression at the teacher's.

Shape legend: B batch, T tokens, N points, S student width, D teacher width, W either width, C latent width,
P distinct pairs N(N−1)/2, J I K a triplet's apex and its other two points.
"""
from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kdarch.checks import check, choice_arg, fail, int_arg, is_int, tensor_arg
from kdarch.distill.features import check_mask, check_state_pair, compute_dtype

KINDS = ("rkd_distance", "rkd_angle", "similarity_preserving")
OVER = ("samples", "tokens")
SOURCES = ("hidden", "mla")


# --------------------------------------------------------------------------------------------- losses
def _points(who: str, student, teacher, min_n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Validated (student [N, S], detached teacher [N, D]) in the compute dtype."""
    for side, x in (("student", student), ("teacher", teacher)):
        tensor_arg(f"{who}: {side}", x, dim=2, floating=True, what="a float tensor [N, width]")
    N = student.shape[0]
    check(N >= min_n, f"{who}: student", f"at least {min_n} points [N, width]", student)
    check(teacher.shape[0] == N, f"{who}: teacher", f"the student's N={N} points [N, width] (widths may differ)",
          teacher)
    check(teacher.device == student.device, f"{who}: teacher", f"a tensor on the student's device ({student.device})",
          teacher.device)
    dt = compute_dtype(student, teacher)
    return student.to(dt), teacher.detach().to(dt)


def _normalised_distances(x_NW: torch.Tensor) -> torch.Tensor:
    d_P = torch.pdist(x_NW)  # [N(N-1)/2] distinct pairs
    return d_P / d_P.mean().clamp_min(torch.finfo(d_P.dtype).tiny)


def rkd_distance_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """RKD-D between student [N, S] and teacher [N, D] points (N ≥ 2); see the module docstring."""
    s_NS, t_ND = _points("rkd_distance_loss", student, teacher, 2)
    return F.smooth_l1_loss(_normalised_distances(s_NS), _normalised_distances(t_ND))


def _triplet_cosines(x_NW: torch.Tensor) -> torch.Tensor:
    """cos_JIK[j, i, k] = cos∠(x_i − x_j, x_k − x_j), 0 where x_i or x_k coincides with x_j, from the differences
    themselves (see the module docstring)."""
    d_JIW = x_NW[None, :, :] - x_NW[:, None, :]  # x_i − x_j, exact to rounding however close the points
    sq_JI = d_JIW.square().sum(-1)
    apart_JI = sq_JI > 0
    inv_JI = torch.where(apart_JI, torch.where(apart_JI, sq_JI, 1.0).rsqrt(), 0.0)  # 0: a coincident pair, no grad
    u_JIW = d_JIW * inv_JI[..., None]  # unit directions from each apex j
    return torch.bmm(u_JIW, u_JIW.transpose(1, 2)).clamp(-1, 1)


def rkd_angle_loss(student: torch.Tensor, teacher: torch.Tensor, max_n: int = 128) -> torch.Tensor:
    """RKD-A between student [N, S] and teacher [N, D] points (3 ≤ N ≤ max_n); see the module docstring.
    Builds a few [N, N, N] tensors (N = 128 is ~2M triplets, N = 512 would be ~134M) and the [N, N, width]
    differences of each side."""
    int_arg("rkd_angle_loss: max_n", max_n, min=3)
    s_NS, t_ND = _points("rkd_angle_loss", student, teacher, 3)
    N = s_NS.shape[0]
    check(N <= max_n, "rkd_angle_loss: student", f"at most max_n={max_n} points (N={N} points make "
          f"{N * (N - 1) * (N - 2)} triplets, O(N³) memory): subsample the points or raise max_n", student)
    eye_NN = torch.eye(N, dtype=torch.bool, device=s_NS.device)
    distinct_JIK = ~(eye_NN[:, :, None] | eye_NN[:, None, :] | eye_NN[None])
    err_JIK = F.smooth_l1_loss(_triplet_cosines(s_NS), _triplet_cosines(t_ND), reduction="none")
    return err_JIK[distinct_JIK].mean()


def similarity_preserving_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """SP between student [N, S] and teacher [N, D] points (N ≥ 2); see the module docstring."""
    s_NS, t_ND = _points("similarity_preserving_loss", student, teacher, 2)
    g_s_NN, g_t_NN = F.normalize(s_NS @ s_NS.T, dim=1), F.normalize(t_ND @ t_ND.T, dim=1)
    return (g_s_NN - g_t_NN).square().sum() / s_NS.shape[0] ** 2


# ----------------------------------------------------------------------------------------- MLA latents
_LATENT_NORM = re.compile(r"(?:^|\.)layers\.(\d+)\.(?:attn\.kv_norm|self_attn\.kv_a_layernorm)$")


def mla_latent_norms(model: nn.Module) -> list[nn.Module]:
    """The KV-latent norms of the main blocks in layer order: kdarch `layers.<i>.attn.kv_norm`, Hugging Face
    DeepseekV3 `layers.<i>.self_attn.kv_a_layernorm` (MTP blocks are not main layers and are left out)."""
    check(isinstance(model, nn.Module), "mla_latent_norms: model", "an nn.Module", model)
    found: dict[int, tuple[str, nn.Module]] = {}
    for name, module in model.named_modules():
        hit = _LATENT_NORM.search(name)
        if hit is None:
            continue
        i = int(hit.group(1))
        if i in found:
            fail("mla_latent_norms: model", f"one MLA latent norm per layer, not two for layer {i} (pass the model "
                 f"itself, not a module holding several models)", [found[i][0], name])
        found[i] = (name, module)
    check(bool(found), "mla_latent_norms: model", "MLA latent norms: modules named layers.<i>.attn.kv_norm (kdarch) "
          "or layers.<i>.self_attn.kv_a_layernorm (Hugging Face DeepseekV3)",
          f"a {type(model).__name__} that has no MLA latent norm")
    return [found[i][1] for i in sorted(found)]


@contextmanager
def capture_mla_latents(model: nn.Module) -> Iterator[list[list[torch.Tensor]]]:
    """Collect the normalised KV latents of the forward passes run inside the block.

    Yields a list that fills as the model runs: entry k holds forward pass k's latents, one [B, T, C] tensor
    per main layer, in layer order (a pass begins at each call of `model`). The tensors keep their autograd
    graph (the student's latent loss reaches its weights); run the teacher under no_grad. The hooks are
    removed on exit, also on error. Activation checkpointing re-runs blocks in backward and fires the hooks
    again: capture from a model without it."""
    norms = mla_latent_norms(model)
    passes: list[list[torch.Tensor]] = []

    def begin(*_):
        passes.append([])

    def grab(_module, _args, latent_BTC):
        if not passes or len(passes[-1]) == len(norms):  # a block called outside `model` starts its own pass
            passes.append([])
        passes[-1].append(latent_BTC)

    handles = [model.register_forward_pre_hook(begin)] + [n.register_forward_hook(grab) for n in norms]
    try:
        yield passes
    finally:
        for h in handles:
            h.remove()


# --------------------------------------------------------------------------------------------- module
@dataclass(frozen=True)
class RelationKDConfig:
    """What `RelationDistiller` computes; validated on construction."""
    kind: str = "similarity_preserving"
    """"rkd_distance" (RKD-D), "rkd_angle" (RKD-A) or "similarity_preserving" (SP): one of KINDS, named after
    the loss functions."""
    over: str = "tokens"
    """"samples": relations among the sequences of a batch; "tokens": among the tokens of each sequence."""
    source: str = "hidden"
    """What forward receives: "hidden" (hidden-state tuples, index 0 = embedding output, i = block i) or
    "mla" (one pass of `capture_mla_latents`, index i = block i's latent): one of SOURCES."""
    layers: tuple[int, int] = (-1, -1)
    """(student index, teacher index) into those sequences; negative indices count from the end."""
    max_points: int = 128
    """kind="rkd_angle": groups with more points use this many, evenly spaced (deterministic); O(N³ + N²·width)
    cost."""

    def __post_init__(self):
        for name, allowed in (("kind", KINDS), ("over", OVER), ("source", SOURCES)):
            choice_arg(f"RelationKDConfig.{name}", getattr(self, name), allowed)
        try:
            layers = tuple(self.layers)
        except TypeError:
            layers = ()
        check(len(layers) == 2 and all(is_int(i) for i in layers), "RelationKDConfig.layers",
              "a (student index, teacher index) pair of ints", self.layers)
        object.__setattr__(self, "layers", layers)
        int_arg("RelationKDConfig.max_points", self.max_points, min=3)


class RelationDistiller(nn.Module):
    """Relation KD on [B, T, width] states; forward returns the scalar loss. No parameters: widths may differ.
    Arguments are the fields of `RelationKDConfig`."""

    def __init__(self, kind: str = "similarity_preserving", over: str = "tokens", source: str = "hidden",
                 layers: tuple[int, int] = (-1, -1), max_points: int = 128):
        super().__init__()
        self.config = RelationKDConfig(kind, over, source, layers, max_points)

    def extra_repr(self) -> str:
        c = self.config
        return f"kind={c.kind!r}, over={c.over!r}, source={c.source!r}, layers={c.layers}"

    def _loss(self, s_NS: torch.Tensor, t_ND: torch.Tensor) -> torch.Tensor:
        kind, cap = self.config.kind, self.config.max_points
        if kind == "rkd_angle":
            n = s_NS.shape[0]
            if n > cap:
                keep = torch.linspace(0, n - 1, cap, device=s_NS.device).round().long()
                s_NS, t_ND = s_NS[keep], t_ND[keep]
            return rkd_angle_loss(s_NS, t_ND, cap)
        return rkd_distance_loss(s_NS, t_ND) if kind == "rkd_distance" else similarity_preserving_loss(s_NS, t_ND)

    def forward(self, student_states: Sequence[torch.Tensor], teacher_states: Sequence[torch.Tensor],
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """student_states / teacher_states: per `source`, the hidden-state tuples or one captured pass of MLA
        latents of each model; mask: optional bool [B, T], True = valid token. Returns the scalar loss: 0 if
        no group has enough valid points (2; 3 for "rkd_angle")."""
        cfg, who = self.config, "RelationDistiller"
        what = "hidden states" if cfg.source == "hidden" else "MLA latents"
        shape = check_state_pair(f"{who} (source={cfg.source!r})", student_states, teacher_states)
        for j, (side, states) in enumerate((("student", student_states), ("teacher", teacher_states))):
            n = len(states)
            check(-n <= cfg.layers[j] < n, f"{who}: RelationKDConfig.layers[{j}]",
                  f"a {side} index in [{-n}, {n - 1}] into its {n} {what}", cfg.layers[j])
        h_s, h_t = student_states[cfg.layers[0]], teacher_states[cfg.layers[1]].detach()
        mask_BT = check_mask(who, mask, shape, h_s.device)
        if mask_BT is None:
            mask_BT = torch.ones(shape, dtype=torch.bool, device=h_s.device)
        min_n = 3 if cfg.kind == "rkd_angle" else 2
        groups = shape[0] if cfg.over == "samples" else shape[1]
        if groups < min_n:
            unit = "sequences per batch (batch size)" if cfg.over == "samples" else "tokens per sequence"
            fail(f"{who}: student states", f"at least {min_n} {unit} for kind={cfg.kind!r} over={cfg.over!r}", h_s)
        zero = h_s.flatten()[:0].sum().to(compute_dtype(h_s, h_t))  # 0 attached to the student's graph
        if cfg.over == "samples":
            n_B1 = mask_BT.sum(1, keepdim=True)
            keep_B = n_B1[:, 0] > 0
            if int(keep_B.sum()) < min_n:
                return zero
            dt = zero.dtype
            mean = [torch.where(mask_BT[..., None], x.to(dt), 0).sum(1)[keep_B] / n_B1[keep_B] for x in (h_s, h_t)]
            return self._loss(*mean)
        losses = []
        for b in range(shape[0]):
            idx = mask_BT[b].nonzero().squeeze(1)
            if idx.numel() >= min_n:
                losses.append(self._loss(h_s[b, idx], h_t[b, idx]))
        return torch.stack(losses).mean() if losses else zero
