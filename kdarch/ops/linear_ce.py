"""Fused output head + cross-entropy: the loss of `h @ W.T` against labels without keeping [N, V] logits.

A plain `F.cross_entropy(head(h), y)` keeps the logits, their log-softmax and, in backward, their
gradient alive: three [N, V] fp32 tensors, the largest activations of a small-vocabulary-heavy student.
Here the rows are processed in chunks and each chunk's gradient is computed right away in the forward
pass (d logits = softmax - onehot), folded into dH (kept, [N, D]) and dW (kept, [V, D]); backward only
scales them by the incoming gradient. Same FLOPs as the unfused path, no recomputation, peak memory of
one chunk of logits. The logits can still be returned (without autograd history) for inspection.

Shape legend: N rows (tokens), D hidden width, V vocabulary, C rows per chunk.
"""
from __future__ import annotations

import torch


def _chunked_loss_and_grads(h_ND, w_VD, labels_N, ignore_index: int, chunk: int, want_gh: bool, want_gw: bool,
                            logits_out: torch.Tensor | None):
    """Sum of per-row CE over valid rows, the row count, and (on request) d(mean loss)/dh and /dw."""
    n_valid = (labels_N != ignore_index).sum()
    inv_n = 1.0 / n_valid.clamp_min(1).to(torch.float32)
    grad_h_ND = torch.empty_like(h_ND) if want_gh else None
    grad_w_VD = torch.zeros(w_VD.shape, dtype=torch.float32, device=w_VD.device) if want_gw else None
    loss = torch.zeros((), dtype=torch.float32, device=h_ND.device)
    for s in range(0, h_ND.shape[0], chunk):
        h_CD, y_C = h_ND[s:s + chunk], labels_N[s:s + chunk]
        logits_CV = (h_CD @ w_VD.T).float()
        if logits_out is not None:
            logits_out[s:s + chunk] = logits_CV
        valid_C = y_C != ignore_index
        safe_y_C = torch.where(valid_C, y_C, 0)[:, None]
        lse_C = torch.logsumexp(logits_CV, dim=-1)
        loss += ((lse_C - logits_CV.gather(1, safe_y_C).squeeze(1)) * valid_C).sum()
        if want_gh or want_gw:
            g_CV = logits_CV.sub_(lse_C[:, None]).exp_()  # softmax, in place of the logits
            g_CV.scatter_add_(1, safe_y_C, -torch.ones_like(safe_y_C, dtype=g_CV.dtype))
            g_CV.mul_((valid_C * inv_n)[:, None])
            if want_gh:
                grad_h_ND[s:s + chunk] = g_CV.to(w_VD.dtype) @ w_VD
            if want_gw:
                grad_w_VD.addmm_(g_CV.T, h_CD.float())
    return loss * inv_n, grad_h_ND, grad_w_VD


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h_ND, w_VD, labels_N, ignore_index: int, chunk: int, logits_out):
        loss, grad_h_ND, grad_w_VD = _chunked_loss_and_grads(
            h_ND, w_VD, labels_N, ignore_index, chunk, ctx.needs_input_grad[0], ctx.needs_input_grad[1], logits_out)
        ctx.save_for_backward(grad_h_ND, grad_w_VD)
        ctx.w_dtype = w_VD.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h_ND, grad_w_VD = ctx.saved_tensors
        gh = grad_h_ND * grad_loss.to(grad_h_ND.dtype) if grad_h_ND is not None else None
        gw = (grad_w_VD * grad_loss).to(ctx.w_dtype) if grad_w_VD is not None else None
        return gh, gw, None, None, None, None


def linear_cross_entropy(h_ND: torch.Tensor, w_VD: torch.Tensor, labels_N: torch.Tensor, *,
                         ignore_index: int = -100, chunk: int = 1024, return_logits: bool = False):
    """Mean CE of `h @ w.T` against `labels` over rows whose label != ignore_index (0 if there are none).
    Returns the loss, or (loss, logits [N, V] fp32 without autograd history) with return_logits."""
    if h_ND.dim() != 2 or w_VD.dim() != 2 or h_ND.shape[1] != w_VD.shape[1]:
        raise ValueError(f"linear_cross_entropy: expected h [N, D] and w [V, D], got {tuple(h_ND.shape)} and "
                         f"{tuple(w_VD.shape)}")
    if labels_N.shape != h_ND.shape[:1]:
        raise ValueError(f"linear_cross_entropy: expected labels [{h_ND.shape[0]}], got {tuple(labels_N.shape)}")
    logits = torch.empty(h_ND.shape[0], w_VD.shape[0], device=h_ND.device) if return_logits else None
    if torch.is_grad_enabled() and (h_ND.requires_grad or w_VD.requires_grad):
        loss = _LinearCrossEntropy.apply(h_ND, w_VD, labels_N, ignore_index, chunk, logits)
    else:
        loss = _chunked_loss_and_grads(h_ND, w_VD, labels_N, ignore_index, chunk, False, False, logits)[0]
    return (loss, logits) if return_logits else loss
