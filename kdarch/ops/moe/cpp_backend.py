"""The "cpp" backends of `moe_ffn` and `moe_ffn_fp8`: routing, permute, SwiGLU and combine from csrc/, expert
GEMMs through torch._grouped_mm (or the FP8 grouped linear).

Why this split: the expert GEMMs are what BLAS / cuBLAS do best; around them the torch backend spends its
time in many small ops (argsort + searchsorted + scatter for the routing, index_select, float copies and a
sum for the combine, a dozen elementwise passes for the SwiGLU's backward), each one pass here (the SwiGLU
on the CPU; CUDA tensors take the torch backend's). The dataflow is the torch backend's grouped-mm FFN
unchanged (routing weight folded into the down projection's input, only the [M, 2I] gate/up pre-activations
saved, a hand-written backward), so the two backends agree to fp32 rounding: the combine adds the K rows in
the same order, the SwiGLU computes in the same order with an exp of its own. As there, forward and backward
are custom ops with fakes, so torch.compile traces the model around them in any dtype. Where
torch._grouped_mm cannot take the dtype or layout, the torch backend's padded-bmm path runs instead.

Legend: T tokens, K slots per token (top-k), E experts, H hidden, I expert intermediate, M = T*K rows.
"""

from __future__ import annotations

import torch

from kdarch.ops.backend import register
from kdarch.ops.cpp import ops as C
from kdarch.ops.cpp.build import check_device, cpp_available
from kdarch.ops.moe.torch_backend import (
    TORCH_SWIGLU,
    _aligned_copy,
    few_rows,
    grouped_mm_ok,
    moe_ffn_fp8_composed,
    moe_ffn_gathered,
    moe_ffn_torch,
    register_ffn_autograd,
    swiglu_experts_bwd,
    swiglu_experts_fwd,
)

Tensor = torch.Tensor
CPP_SWIGLU = (C.swiglu_forward, C.swiglu_backward)
"""The compiled SwiGLU between the expert GEMMs (CPU); CUDA tensors take the torch backend's."""


def _swiglu(x: Tensor):
    return CPP_SWIGLU if x.device.type == "cpu" else TORCH_SWIGLU


def _lib():
    return torch.ops.kdarch_C


@torch.library.custom_op("kdarch::moe_cpp_ffn_fwd", mutates_args=())
def cpp_ffn_fwd(x_TH: Tensor, topk_weights_TK: Tensor, w_gate_up_E2IH: Tensor, w_down_EHI: Tensor,
                sorted_idx_M: Tensor, inv_idx_M: Tensor, ends_E: Tensor) -> tuple[Tensor, Tensor]:
    """(out [T, H], h [M, 2I] gate/up pre-activations kept for backward)."""
    K = topk_weights_TK.shape[1]
    w_M1 = topk_weights_TK.reshape(-1)[sorted_idx_M].float()[:, None]
    y_MH, h_M2I = swiglu_experts_fwd(_lib().moe_permute(x_TH, sorted_idx_M, K), w_M1, _aligned_copy(w_gate_up_E2IH),
                                     _aligned_copy(w_down_EHI), ends_E, _swiglu(x_TH))
    return _lib().moe_unpermute(y_MH, inv_idx_M, K, None, x_TH.dtype), h_M2I


@torch.library.custom_op("kdarch::moe_cpp_ffn_bwd", mutates_args=())
def cpp_ffn_bwd(grad_out_TH: Tensor, x_TH: Tensor, topk_weights_TK: Tensor, w_gate_up_E2IH: Tensor,
                w_down_EHI: Tensor, sorted_idx_M: Tensor, inv_idx_M: Tensor, ends_E: Tensor, h_M2I: Tensor
                ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(d x, d topk_weights, d w_gate_up, d w_down), as the torch backend's grouped_ffn_bwd."""
    T, K = topk_weights_TK.shape
    w_M1 = topk_weights_TK.reshape(-1)[sorted_idx_M].float()[:, None]
    grad_x_MH, grad_w_M, d_w_gate_up, d_w_down = swiglu_experts_bwd(
        _lib().moe_permute(grad_out_TH, sorted_idx_M, K), _lib().moe_permute(x_TH, sorted_idx_M, K), w_M1, h_M2I,
        _aligned_copy(w_gate_up_E2IH), _aligned_copy(w_down_EHI), ends_E, _swiglu(x_TH))
    grad_x_TH = _lib().moe_unpermute(grad_x_MH, inv_idx_M, K, None, x_TH.dtype)
    grad_weights_TK = grad_w_M[inv_idx_M].view(T, K).to(topk_weights_TK.dtype)
    return grad_x_TH, grad_weights_TK, d_w_gate_up.to(w_gate_up_E2IH.dtype), d_w_down.to(w_down_EHI.dtype)


register_ffn_autograd(cpp_ffn_fwd, cpp_ffn_bwd)


def moe_ffn_cpp(x_TH, topk_ids_TK, topk_weights_TK, w_gate_up_E2IH, w_down_EHI):
    """moe_ffn on the compiled routing / permute / combine (inputs already validated by kdarch.ops.moe)."""
    check_device("moe_ffn", x_TH)
    if few_rows(x_TH, topk_ids_TK, w_gate_up_E2IH):
        return moe_ffn_gathered(x_TH, topk_ids_TK, topk_weights_TK, w_gate_up_E2IH, w_down_EHI)
    if not grouped_mm_ok(x_TH.dtype, w_gate_up_E2IH, w_down_EHI):
        return moe_ffn_torch(x_TH, topk_ids_TK, topk_weights_TK, w_gate_up_E2IH, w_down_EHI, impl="padded_bmm")
    _, offsets_E1, sorted_idx_M, inv_idx_M = C.routing_metadata(topk_ids_TK, w_gate_up_E2IH.shape[0])
    ends_E = offsets_E1[1:].to(torch.int32)
    return cpp_ffn_fwd(x_TH, topk_weights_TK, w_gate_up_E2IH, w_down_EHI, sorted_idx_M, inv_idx_M, ends_E)[0]


def moe_ffn_fp8_cpp(x_TH, topk_ids_TK, topk_weights_TK, w_gate_up_E2IH, w_down_EHI):
    """moe_ffn_fp8 with the compiled routing and the "cpp" FP8 quantise / dequantise ops."""
    check_device("moe_ffn", x_TH)
    return moe_ffn_fp8_composed(x_TH, topk_ids_TK, topk_weights_TK, w_gate_up_E2IH, w_down_EHI,
                                routing=C.routing_metadata, fp8_backend="cpp")


register("moe_ffn", "cpp", moe_ffn_cpp, available=cpp_available)
register("moe_ffn_fp8", "cpp", moe_ffn_fp8_cpp, available=cpp_available)
