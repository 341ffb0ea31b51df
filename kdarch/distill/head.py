"""Fused distillation head: the KD loss of `h @ W.T` without ever holding [N, V] student logits.

The student's output head is the largest activation of distillation: N tokens × V vocabulary logits, their
softmax at T and at 1, the teacher's probabilities and the gradient, each [N, V] fp32 (2 GiB apiece at
4k tokens × 128k vocab). Here tokens go through in chunks of C rows: logits = h_C @ W.T, then the loss and
its gradient w.r.t. those logits (losses.py, hand-written, in reused [C, V] buffers), folded at once into
dL/dh (kept, [N, D]) and dL/dW (kept, [V, D]); backward only scales them (as `kdarch.ops.linear_ce`).
Teacher signal: dense logits [N, V] (read one chunk at a time) or a `TopKTeacher`. Rows whose label is
ignore_index are skipped entirely, so prompt tokens cost nothing.

Row i of h predicts labels[i] and is compared with teacher row i: shift before calling (for a causal LM,
h[:, :-1], labels[:, 1:], teacher[:, :-1]). Entries masked with -inf in the teacher and, through ±inf rows
of W, in the student contribute nothing (losses.py); the weight's finiteness costs one read of W per call.

Shape legend: N rows (tokens), D hidden width, V vocabulary, K top-k.
"""
from __future__ import annotations

import torch
from torch import nn

from kdarch.checks import check
from kdarch.distill.losses import KDLossConfig, KDTerms, check_chunk, check_teacher_and_labels, compute


def fused_kd_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor | None, teacher, *,
                  kind: str = "forward_kl", temperature: float = 1.0, alpha: float = 0.5, beta: float = 0.5,
                  ignore_index: int = -100, chunk: int | None = None, return_terms: bool = False):
    """The same loss as `kd_loss(hidden @ weight.T, teacher, labels, ...)`, computed in chunks of tokens.

    hidden [..., D] float (e.g. `out.last_hidden_state`), weight [V, D] of the same dtype (e.g.
    `model.head.weight`), labels [...] int or None, teacher [..., V] logits or a TopKTeacher. Differentiable
    in hidden and weight (first order). Returns the scalar loss, or KDTerms with return_terms."""
    cfg = KDLossConfig(kind, temperature, alpha, beta, ignore_index)
    check_head("fused_kd_loss", hidden, weight, chunk)
    V, D = weight.shape
    teacher, labels_N = check_teacher_and_labels("fused_kd_loss", hidden.shape[:-1], V, hidden.device, teacher,
                                                 labels, cfg)
    return compute(hidden.reshape(-1, D), weight, labels_N, teacher, cfg, chunk, return_terms)


def check_head(who: str, hidden, weight, chunk, hidden_name: str = "hidden") -> None:
    """hidden [..., D] and weight [V, D]: float tensors of one dtype and device; chunk None or an int >= 1."""
    check(isinstance(weight, torch.Tensor) and weight.is_floating_point() and weight.dim() == 2, f"{who}: weight",
          "a float tensor [V, D]", weight)
    D = weight.shape[1]
    check(isinstance(hidden, torch.Tensor) and hidden.is_floating_point() and hidden.dim() >= 1
          and hidden.shape[-1] == D, f"{who}: {hidden_name}", f"a float tensor [..., D] with D = {D} like weight "
          f"[V, D] = {list(weight.shape)}", hidden)
    check(weight.dtype == hidden.dtype, f"{who}: weight", f"{hidden_name}'s dtype ({hidden.dtype})", weight.dtype)
    check(weight.device == hidden.device, f"{who}: weight", f"a tensor on {hidden_name}'s device ({hidden.device})",
          weight.device)
    check_chunk(who, chunk)


class DistillationHead(nn.Module):
    """`fused_kd_loss` with its settings held, Liger-style: it owns no parameters; pass the student's head
    weight on each call, `DistillationHead(kind="jsd", temperature=2.0)(h, model.head.weight, labels, t)`."""

    def __init__(self, kind: str = "forward_kl", temperature: float = 1.0, alpha: float = 0.5, beta: float = 0.5,
                 ignore_index: int = -100, chunk: int | None = None):
        super().__init__()
        self.cfg = KDLossConfig(kind, temperature, alpha, beta, ignore_index)
        self.chunk = chunk

    def forward(self, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor | None, teacher,
                return_terms: bool = False) -> torch.Tensor | KDTerms:
        c = self.cfg
        return fused_kd_loss(hidden, weight, labels, teacher, kind=c.kind, temperature=c.temperature, alpha=c.alpha,
                             beta=c.beta, ignore_index=c.ignore_index, chunk=self.chunk, return_terms=return_terms)

    def extra_repr(self) -> str:
        c = self.cfg
        return f"kind={c.kind!r}, temperature={c.temperature}, alpha={c.alpha}, beta={c.beta}, chunk={self.chunk}"
