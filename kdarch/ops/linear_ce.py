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
    """Mean CE over valid rows and (on request) its gradients d/dh, d/dw.

    Per chunk only two [C, V] passes touch memory: the logits GEMM and one softmax. The one-hot part of
    d logits = softmax - onehot never becomes a [C, V] tensor: it is applied on the [C, D] side
    (dh -= w[y], dw[y] -= h), and the 1/n_valid scale rides on the [C, D] operands too."""
    valid_N = labels_N != ignore_index
    inv_n = 1.0 / valid_N.sum().clamp_min(1).to(torch.float32)
    grad_h_ND = torch.empty_like(h_ND) if want_gh else None
    grad_w_VD = torch.zeros(w_VD.shape, dtype=torch.float32, device=w_VD.device) if want_gw else None
    loss = torch.zeros((), dtype=torch.float32, device=h_ND.device)
    for s in range(0, h_ND.shape[0], chunk):
        h_CD, valid_C = h_ND[s:s + chunk], valid_N[s:s + chunk]
        y_C1 = torch.where(valid_C, labels_N[s:s + chunk], 0)[:, None]
        if logits_out is not None:
            logits_CV = torch.mm(h_CD, w_VD.T, out=logits_out[s:s + chunk]) if h_ND.dtype == torch.float32 \
                else logits_out[s:s + chunk].copy_(h_CD @ w_VD.T)
        else:
            logits_CV = (h_CD @ w_VD.T).float()
        # one exp pass gives both the softmax and, exactly, log-sum-exp: nll = lse - logit_y never takes the log of
        # an underflowed probability, and nothing here depends on the values (no host sync, fixed shapes)
        m_C1 = logits_CV.amax(dim=-1, keepdim=True)
        probs_CV = (logits_CV - m_C1).exp_()
        z_C1 = probs_CV.sum(dim=-1, keepdim=True)
        probs_CV.div_(z_C1)
        nll_C = (m_C1 + z_C1.log() - logits_CV.gather(1, y_C1)).squeeze(1)
        loss += (nll_C * valid_C).sum()
        if want_gh or want_gw:
            scale_C1 = (valid_C * inv_n)[:, None]
            if want_gh:
                gh_CD = probs_CV.to(w_VD.dtype) @ w_VD
                grad_h_ND[s:s + chunk] = (gh_CD - w_VD[y_C1.squeeze(1)]) * scale_C1.to(gh_CD.dtype)
            if want_gw:
                hs_CD = h_CD.float() * scale_C1
                grad_w_VD.addmm_(probs_CV.T, hs_CD).index_add_(0, y_C1.squeeze(1), -hs_CD)
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
                         ignore_index: int = -100, chunk: int | None = None, return_logits: bool = False):
    """Mean CE of `h @ w.T` against `labels` over rows whose label != ignore_index (0 if there are none).
    Returns the loss, or (loss, logits [N, V] fp32 without autograd history) with return_logits.
    `chunk` rows are processed at a time (default: about 64 MiB of fp32 logits)."""
    if h_ND.dim() != 2 or w_VD.dim() != 2 or h_ND.shape[1] != w_VD.shape[1]:
        raise ValueError(f"linear_cross_entropy: expected h [N, D] and w [V, D], got {tuple(h_ND.shape)} and "
                         f"{tuple(w_VD.shape)}")
    if labels_N.shape != h_ND.shape[:1]:
        raise ValueError(f"linear_cross_entropy: expected labels [{h_ND.shape[0]}], got {tuple(labels_N.shape)}")
    logits = torch.empty(h_ND.shape[0], w_VD.shape[0], device=h_ND.device) if return_logits else None
    chunk = chunk or max(1, 2**24 // w_VD.shape[0])  # ~64 MiB of fp32 logits per chunk
    if torch.is_grad_enabled() and (h_ND.requires_grad or w_VD.requires_grad):
        loss = _LinearCrossEntropy.apply(h_ND, w_VD, labels_N, ignore_index, chunk, logits)
    else:
        loss = _chunked_loss_and_grads(h_ND, w_VD, labels_N, ignore_index, chunk, False, False, logits)[0]
    return (loss, logits) if return_logits else loss
