"""The "torch" backends of `moe_ffn` and `moe_ffn_fp8`: dropless routed-expert SwiGLU in vectorised PyTorch.

Why this shape: the (token, slot) rows are sorted by expert once, so every expert's rows are
one contiguous segment; both expert GEMMs then run as ONE grouped GEMM over those segments
(`torch._grouped_mm`, or a padded `bmm` where grouped_mm cannot take the dtype / layout), and
nothing on the hot path loops over experts in Python. The un-permute is a gather by the
inverse permutation followed by a sum over the K slots, in fp32 with the routing weights, so
forward and backward are deterministic (no float atomics, no index_add on repeated indices).
This is the same dataflow the Triton kernels implement, and the CPU fast path.

The FP8 variant (`moe_ffn_fp8_composed`) is a composition rather than a kernel: routing, permute, SwiGLU
and combine as here, both expert GEMMs through kdarch.ops.fp8's grouped FP8 linear. Its two backends
differ only in the routing and the FP8 ops they use, so the composition lives here once and the Triton
backend passes its own pieces.

Legend: T tokens, K slots per token (top-k), E experts, H hidden, I expert intermediate,
M = T*K routed rows, C = rows of the busiest expert (padded bmm only), N/D a GEMM's out/in.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from kdarch.ops.backend import register
from kdarch.ops.fp8.linear import fp8_matmul

_GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def routing_metadata(topk_ids_TK: torch.Tensor, n_experts: int):
    """(counts_E, offsets_E1, sorted_idx_M, inv_idx_M), int64; see kdarch.kernels.moe_ref."""
    ids_M = topk_ids_TK.reshape(-1).long()
    sorted_idx_M = torch.argsort(ids_M, stable=True)
    # offsets[e] = #rows with id < e; fixed-shape and sync-free (bincount is neither under compile)
    e_E1 = torch.arange(n_experts + 1, device=ids_M.device)
    offsets_E1 = torch.searchsorted(ids_M[sorted_idx_M], e_E1)
    counts_E = offsets_E1.diff()
    inv_idx_M = torch.empty_like(sorted_idx_M)
    inv_idx_M[sorted_idx_M] = torch.arange(ids_M.numel(), device=ids_M.device)
    return counts_E, offsets_E1, sorted_idx_M, inv_idx_M


class _PermuteRows(torch.autograd.Function):
    """out_MD = src[idx_M // fan], where idx_M is a permutation of the len(src)*fan slots.

    Backward gathers by the inverse permutation and sums each source row's `fan` copies,
    which is deterministic (autograd's default would index_add onto repeated rows).
    """

    @staticmethod
    def forward(ctx, src_RD, idx_M, inv_idx_M, fan: int):
        ctx.save_for_backward(inv_idx_M)
        ctx.fan = fan
        return src_RD.index_select(0, idx_M // fan if fan > 1 else idx_M)

    @staticmethod
    def backward(ctx, grad_MD):
        (inv_idx_M,) = ctx.saved_tensors
        g_MD = grad_MD.index_select(0, inv_idx_M)
        return g_MD.view(-1, ctx.fan, g_MD.shape[-1]).sum(1), None, None, None


def _aligned(t: torch.Tensor) -> bool:
    """torch._grouped_mm wants 16-byte aligned base pointers and non-unit strides."""
    step = 16 // t.element_size()
    return t.data_ptr() % 16 == 0 and all(s % step == 0 for s in t.stride() if s != 1)


def grouped_mm_ok(dtype: torch.dtype, *w_END: torch.Tensor) -> bool:
    """Can torch._grouped_mm run the expert GEMMs with these weights, forward and backward?

    It needs 16-byte aligned rows in every operand and gradient: each weight's two inner
    sizes (which are also the activations' row lengths) must be multiples of 16 bytes.
    """
    step = 16 // torch.empty((), dtype=dtype).element_size()
    tracing = torch.compiler.is_compiling()  # no pointers to look at: the op copies a misaligned weight itself
    return (hasattr(torch, "_grouped_mm") and dtype in _GROUPED_MM_DTYPES
            and all(w.dtype == dtype and (tracing or _aligned(w)) and all(n % step == 0 for n in w.shape[1:])
                    for w in w_END))


def _padded_expert_linear(x_MD, w_END, slot_M, n_pad):
    """y_MN[j] = x_MD[j] @ w_END[e(j)].T through a zero-padded [E, n_pad, D] batch; slot_M is row j's place."""
    E, N, D = w_END.shape
    x_pad = x_MD.new_zeros(E * n_pad, D).index_copy(0, slot_M, x_MD).view(E, n_pad, D)
    y_pad = torch.bmm(x_pad, w_END.transpose(-1, -2))  # [E, C, N]
    return y_pad.reshape(E * n_pad, N).index_select(0, slot_M)


# The whole routed-expert FFN on torch._grouped_mm, forward and a hand-written backward, as two custom ops.
#
# The routing weight is folded into the down-projection's input (sum_k w_k down(a_k) = sum_k down(w_k a_k)), so
# the combine is a plain sum of K rows and the weight's gradient is <d(w a), a>, which needs only a. Backward
# keeps just the [M, 2I] gate/up pre-activations and recomputes the gathered rows and the SwiGLU output: about
# a quarter of the activation memory autograd would keep, and one GEMM fewer than differentiating through the
# combine. As custom ops with fakes they are opaque to torch.compile, which then traces the model around them
# in any dtype (torch._grouped_mm's own fake kernel accepts only bf16 in torch 2.13).

def _aligned_copy(t: torch.Tensor) -> torch.Tensor:
    return t if _aligned(t) else t.clone()


def swiglu_weighted(h_M2I, w_M1):
    """y [M, I] = w * silu(gate) * up in fp32, stored in h's dtype (h = [gate | up] pre-activations [M, 2I],
    w [M, 1] fp32 routing weights). Differentiable."""
    gate_MI, up_MI = h_M2I.float().chunk(2, dim=-1)
    return (F.silu(gate_MI) * up_MI * w_M1).to(h_M2I.dtype)


def swiglu_weighted_bwd(grad_y_MI, h_M2I, w_M1):
    """Backward of `swiglu_weighted` from grad_y [M, I] fp32: (grad_h [M, 2I] in h's dtype, grad_w [M] fp32,
    y recomputed for the down projection's weight gradient)."""
    gate_MI, up_MI = h_M2I.float().chunk(2, dim=-1)
    sig_MI = torch.sigmoid(gate_MI)
    silu_MI = gate_MI * sig_MI
    act_MI = silu_MI * up_MI  # SwiGLU output before the routing weight
    grad_w_M = (grad_y_MI * act_MI).sum(dim=-1)
    grad_act_MI = grad_y_MI * w_M1
    grad_gate_MI = grad_act_MI * up_MI * sig_MI * (1 + gate_MI * (1 - sig_MI))
    grad_h_M2I = torch.cat((grad_gate_MI, grad_act_MI * silu_MI), dim=-1).to(h_M2I.dtype)
    return grad_h_M2I, grad_w_M, (act_MI * w_M1).to(h_M2I.dtype)


TORCH_SWIGLU = (swiglu_weighted, swiglu_weighted_bwd)
"""The SwiGLU between the expert GEMMs, forward and backward; the cpp backend passes its compiled pair."""


def swiglu_experts_fwd(x_MH, w_M1, w_gate_up_E2IH, w_down_EHI, ends_E, swiglu=TORCH_SWIGLU):
    """The expert GEMMs on rows already in expert order: (y [M, H] with the routing weight folded in, h [M, 2I])."""
    h_M2I = torch._grouped_mm(x_MH, w_gate_up_E2IH.transpose(-1, -2), offs=ends_E)
    return torch._grouped_mm(swiglu[0](h_M2I, w_M1), w_down_EHI.transpose(-1, -2), offs=ends_E), h_M2I


def swiglu_experts_bwd(grad_y_MH, x_MH, w_M1, h_M2I, w_gate_up_E2IH, w_down_EHI, ends_E, swiglu=TORCH_SWIGLU):
    """Backward of `swiglu_experts_fwd`: (d x rows [M, H], d routing weight [M] in fp32, d w_gate_up, d w_down)."""
    # d(w * act) in fp32 (a no-op cast for fp32): it feeds the routing weights' gradient
    grad_act_w_MI = torch._grouped_mm(grad_y_MH.float(), w_down_EHI.float(), offs=ends_E)
    grad_h_M2I, grad_w_M, act_w_MI = swiglu[1](grad_act_w_MI, h_M2I, w_M1)
    d_w_down = torch._grouped_mm(grad_y_MH.t(), act_w_MI, offs=ends_E)  # [E, H, I]
    d_w_gate_up = torch._grouped_mm(grad_h_M2I.t(), x_MH, offs=ends_E)  # [E, 2I, H]
    grad_x_MH = torch._grouped_mm(grad_h_M2I, w_gate_up_E2IH, offs=ends_E)
    return grad_x_MH, grad_w_M, d_w_gate_up, d_w_down


@torch.library.custom_op("kdarch::moe_grouped_ffn_fwd", mutates_args=())
def grouped_ffn_fwd(x_TH: torch.Tensor, topk_weights_TK: torch.Tensor, w_gate_up_E2IH: torch.Tensor,
                    w_down_EHI: torch.Tensor, sorted_idx_M: torch.Tensor, inv_idx_M: torch.Tensor,
                    ends_E: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [T, H], h [M, 2I] gate/up pre-activations kept for backward)."""
    T, K = topk_weights_TK.shape
    w_M1 = topk_weights_TK.reshape(-1)[sorted_idx_M].float()[:, None]
    y_MH, h_M2I = swiglu_experts_fwd(x_TH[sorted_idx_M // K], w_M1, _aligned_copy(w_gate_up_E2IH),
                                     _aligned_copy(w_down_EHI), ends_E)
    return y_MH.float()[inv_idx_M].view(T, K, x_TH.shape[1]).sum(dim=1).to(x_TH.dtype), h_M2I


@torch.library.custom_op("kdarch::moe_grouped_ffn_bwd", mutates_args=())
def grouped_ffn_bwd(grad_out_TH: torch.Tensor, x_TH: torch.Tensor, topk_weights_TK: torch.Tensor,
                    w_gate_up_E2IH: torch.Tensor, w_down_EHI: torch.Tensor, sorted_idx_M: torch.Tensor,
                    inv_idx_M: torch.Tensor, ends_E: torch.Tensor, h_M2I: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d x, d topk_weights, d w_gate_up, d w_down)."""
    T, K = topk_weights_TK.shape
    token_M = sorted_idx_M // K
    w_M1 = topk_weights_TK.reshape(-1)[sorted_idx_M].float()[:, None]
    grad_x_MH, grad_w_M, d_w_gate_up, d_w_down = swiglu_experts_bwd(
        grad_out_TH.contiguous()[token_M], x_TH[token_M], w_M1, h_M2I, _aligned_copy(w_gate_up_E2IH),
        _aligned_copy(w_down_EHI), ends_E)
    grad_x_TH = grad_x_MH.float()[inv_idx_M].view(T, K, x_TH.shape[1]).sum(dim=1).to(x_TH.dtype)
    grad_weights_TK = grad_w_M[inv_idx_M].view(T, K).to(topk_weights_TK.dtype)
    return grad_x_TH, grad_weights_TK, d_w_gate_up.to(w_gate_up_E2IH.dtype), d_w_down.to(w_down_EHI.dtype)


def register_ffn_autograd(fwd_op, bwd_op) -> None:
    """Fakes for a grouped-FFN forward / backward custom-op pair (the torch one here, the cpp one in
    cpp_backend.py: same signatures) and the autograd that joins them."""
    @fwd_op.register_fake
    def _(x_TH, topk_weights_TK, w_gate_up_E2IH, w_down_EHI, sorted_idx_M, inv_idx_M, ends_E):
        return x_TH.new_empty(x_TH.shape), x_TH.new_empty(inv_idx_M.shape[0], w_gate_up_E2IH.shape[1])

    @bwd_op.register_fake
    def _(grad_out_TH, x_TH, topk_weights_TK, w_gate_up_E2IH, w_down_EHI, *_):
        return tuple(torch.empty(t.shape, dtype=t.dtype, device=x_TH.device)
                     for t in (x_TH, topk_weights_TK, w_gate_up_E2IH, w_down_EHI))

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs, output[1])
        ctx.mark_non_differentiable(output[1])

    def backward(ctx, grad_out_TH, _grad_h):
        x, topk_weights, w_gate_up, w_down, sorted_idx, inv_idx, ends, h = ctx.saved_tensors
        grads = bwd_op(grad_out_TH.contiguous(), x, topk_weights, w_gate_up, w_down, sorted_idx, inv_idx, ends, h)
        return *grads, None, None, None

    fwd_op.register_autograd(backward, setup_context=setup_context)


register_ffn_autograd(grouped_ffn_fwd, grouped_ffn_bwd)


HOST_READ_DEVICES = ("cpu",)
"""Device types where `moe_ffn_gathered` reads the expert ids on the host (free there) to run each row against
its expert's weights in place. Elsewhere, and under torch.compile, it gathers the weights: no host read, so a
decode step stays capturable (CUDA graphs) and one graph."""


def few_rows(x_TH: torch.Tensor, topk_ids_TK: torch.Tensor, w_gate_up_E2IH: torch.Tensor) -> bool:
    """Decode-sized inputs (no more token copies than experts, no autograd): `moe_ffn_gathered` runs them. A
    grouped GEMM loops over every expert (two GEMMs, slicing and a host read of the offsets each: hundreds of
    small ops a layer), while a one-token step touches K experts."""
    return topk_ids_TK.numel() <= w_gate_up_E2IH.shape[0] and not (
        torch.is_grad_enabled() and (x_TH.requires_grad or w_gate_up_E2IH.requires_grad))


def moe_ffn_gathered(x_TH, topk_ids_TK, topk_weights_TK, w_gate_up_E2IH, w_down_EHI):
    """moe_ffn for a few rows (decode shapes, `few_rows`), the K slots summed in fp32 in slot order. On the CPU
    (HOST_READ_DEVICES) each (token, slot) row is one GEMV against its expert's weights in place, the ids read
    on the host; elsewhere each row's expert weights are gathered and both expert GEMMs are one bmm each, a
    dozen ops whatever E is. Gathering on the CPU copies the weights at memory speed: 40% of a one-token decode
    step of the tiny preset."""
    T, K = topk_ids_TK.shape
    ids_M = topk_ids_TK.reshape(-1)
    w_M1 = topk_weights_TK.reshape(-1, 1).float()
    if x_TH.device.type in HOST_READ_DEVICES and ids_M.numel() and not torch.compiler.is_compiling():
        experts = ids_M.tolist()  # a free host read on the CPU
        h_M2I = torch.cat([F.linear(x_TH[m // K:m // K + 1], w_gate_up_E2IH[e]) for m, e in enumerate(experts)])
        act_MI = swiglu_weighted(h_M2I, w_M1)
        y_MH = torch.cat([F.linear(act_MI[m:m + 1], w_down_EHI[e]) for m, e in enumerate(experts)])
    else:
        x_M1H = x_TH.repeat_interleave(K, dim=0)[:, None]
        h_M2I = torch.bmm(x_M1H, w_gate_up_E2IH[ids_M].transpose(1, 2)).squeeze(1)
        act_MI = swiglu_weighted(h_M2I, w_M1)
        y_MH = torch.bmm(act_MI[:, None], w_down_EHI[ids_M].transpose(1, 2)).squeeze(1)
    return y_MH.float().view(T, K, w_down_EHI.shape[1]).sum(dim=1).to(x_TH.dtype)


def moe_ffn_torch(x_TH, topk_ids_TK, topk_weights_TK, w_gate_up_E2IH, w_down_EHI,
                  impl: str = "auto"):
    """Vectorised moe_ffn (inputs already validated by kdarch.ops.moe.moe_ffn).

    impl: "auto" (grouped_mm where it supports dtype and layout, else padded bmm),
    "grouped_mm" or "padded_bmm" (for tests and benchmarks).
    """
    if impl not in ("auto", "grouped_mm", "padded_bmm"):
        raise ValueError(f"impl: expected 'auto', 'grouped_mm' or 'padded_bmm', got {impl!r}")
    if impl == "auto" and few_rows(x_TH, topk_ids_TK, w_gate_up_E2IH):
        return moe_ffn_gathered(x_TH, topk_ids_TK, topk_weights_TK, w_gate_up_E2IH, w_down_EHI)
    T, K = topk_ids_TK.shape
    E = w_gate_up_E2IH.shape[0]
    counts_E, offsets_E1, sorted_idx_M, inv_idx_M = routing_metadata(topk_ids_TK, E)
    use_gmm = impl == "grouped_mm" or (
        impl == "auto" and grouped_mm_ok(x_TH.dtype, w_gate_up_E2IH, w_down_EHI))
    if use_gmm:
        ends_E = offsets_E1[1:].to(torch.int32)
        return grouped_ffn_fwd(x_TH, topk_weights_TK, w_gate_up_E2IH, w_down_EHI, sorted_idx_M, inv_idx_M, ends_E)[0]

    x_MH = _PermuteRows.apply(x_TH, sorted_idx_M, inv_idx_M, K)  # rows in expert order
    expert_M = topk_ids_TK.reshape(-1).long()[sorted_idx_M]  # sorted expert id per row
    n_pad = int(counts_E.max()) if counts_E.numel() else 0  # host sync: fallback only
    row_M = torch.arange(x_MH.shape[0], device=x_MH.device)
    slot_M = expert_M * n_pad + row_M - offsets_E1[expert_M]

    h_M2I = _padded_expert_linear(x_MH, w_gate_up_E2IH, slot_M, n_pad)
    gate_MI, up_MI = h_M2I.chunk(2, dim=-1)
    y_MH = _padded_expert_linear(F.silu(gate_MI) * up_MI, w_down_EHI, slot_M, n_pad)

    y_TKH = _PermuteRows.apply(y_MH, inv_idx_M, sorted_idx_M, 1).view(T, K, x_TH.shape[1])  # slot order
    out_TH = torch.bmm(topk_weights_TK.float().unsqueeze(1), y_TKH.float()).squeeze(1)
    return out_TH.to(x_TH.dtype)


def moe_ffn_fp8_composed(x_TH, topk_ids_TK, topk_weights_TK, w_gate_up_E2IH, w_down_EHI, *,
                         routing: Callable = routing_metadata, fp8_backend: str = "torch"):
    """moe_ffn with both expert GEMMs in FP8 (kdarch.ops.fp8's grouped linear: 1x128 activation and gradient
    tiles, 128x128 weight blocks, master weights kept); routing, SwiGLU and combine in fp32.

    routing(topk_ids, E) -> (counts, offsets, sorted_idx, inv_idx) as routing_metadata; fp8_backend names the
    backend of the FP8 quantise / GEMM ops. Inputs already validated by kdarch.ops.moe.moe_ffn.
    """
    T, K = topk_ids_TK.shape
    _, offsets_E1, sorted_idx_M, inv_idx_M = routing(topk_ids_TK, w_gate_up_E2IH.shape[0])
    x_MH = _PermuteRows.apply(x_TH, sorted_idx_M, inv_idx_M, K)
    h_M2I = fp8_matmul(x_MH, w_gate_up_E2IH, offsets_E1, fp8_backend)
    w_M1 = topk_weights_TK.reshape(-1)[sorted_idx_M].float()[:, None]
    act_MI = swiglu_weighted(h_M2I, w_M1).to(x_TH.dtype)  # routing weight folded in, as in the torch path
    y_MH = fp8_matmul(act_MI, w_down_EHI, offsets_E1, fp8_backend)
    y_TKH = _PermuteRows.apply(y_MH.float(), inv_idx_M, sorted_idx_M, 1).view(T, K, x_TH.shape[1])
    return y_TKH.sum(dim=1).to(x_TH.dtype)


def moe_ffn_fp8_torch(x_TH, topk_ids_TK, topk_weights_TK, w_gate_up_E2IH, w_down_EHI):
    """moe_ffn_fp8 on torch routing and the "torch" FP8 ops (quantise in torch, dequantise + fp32 matmul)."""
    return moe_ffn_fp8_composed(x_TH, topk_ids_TK, topk_weights_TK, w_gate_up_E2IH, w_down_EHI,
                                routing=routing_metadata, fp8_backend="torch")


register("moe_ffn", "torch", moe_ffn_torch)
register("moe_ffn_fp8", "torch", moe_ffn_fp8_torch)
