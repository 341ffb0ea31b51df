"""Python face of the kdarch_C ops: their fake (meta) kernels, and the differentiable permute / un-permute.

Why fakes here: the schemas and device kernels are C++ (csrc/registration.cpp, TORCH_LIBRARY(kdarch_C)), but
a fake only has to give output shapes and dtypes, which is plainer in Python; with them torch.compile traces
through the ops without running them and torch.library.opcheck passes. They are registered once, by
kdarch.ops.cpp.build.load(), right after the library is loaded (a fake needs its schema).

Autograd lives in two small Functions rather than on the ops: the backward of a permute is an un-permute by
the inverse index and vice versa, and only the caller holds both indices. Both directions are deterministic
(fp32 sums in a fixed order, every output row written by one thread).

Legend: T tokens, K slots per token, E experts, H row width, M = T*K routed rows, P sorted rows (>= M),
I expert width, R x C a quantised matrix, G rows per scale group.
"""

from __future__ import annotations

import torch

Tensor = torch.Tensor
FP8 = torch.float8_e4m3fn
_BLOCK = 128
_registered = False


def _lib():
    return torch.ops.kdarch_C


def register_fakes() -> None:
    """Register the fake kernel of every kdarch_C op (idempotent; the library must be loaded)."""
    global _registered
    if _registered:
        return
    reg = torch.library.register_fake

    @reg("kdarch_C::moe_routing")
    def _(topk_ids, n_experts, pad_to=1):
        M, i64 = topk_ids.numel(), dict(dtype=torch.int64, device=topk_ids.device)
        P = M if pad_to == 1 else M + n_experts * (pad_to - 1)
        return (topk_ids.new_empty(n_experts, **i64), topk_ids.new_empty(n_experts + 1, **i64),
                topk_ids.new_empty(P, **i64), topk_ids.new_empty(M, **i64))

    @reg("kdarch_C::moe_permute")
    def _(src, idx, fan, weights=None):
        return src.new_empty(idx.shape[0], src.shape[1])

    @reg("kdarch_C::moe_unpermute")
    def _(src, inv_idx, K, weights=None, out_dtype=None):
        return src.new_empty(inv_idx.shape[0] // K, src.shape[1], dtype=out_dtype or src.dtype)

    @reg("kdarch_C::moe_unpermute_weights_grad")
    def _(grad_out, src, inv_idx, K):
        return grad_out.new_empty(inv_idx.shape[0] // K, K, dtype=torch.float32)

    @reg("kdarch_C::swiglu_forward")
    def _(h, w):
        return h.new_empty(h.shape[0], h.shape[1] // 2)

    @reg("kdarch_C::swiglu_backward")
    def _(grad_y, h, w):
        return h.new_empty(h.shape), w.new_empty(h.shape[0]), h.new_empty(h.shape[0], h.shape[1] // 2)

    @reg("kdarch_C::fp8_quantize")
    def _(x, group_rows, amax_floor, pow2_scale):
        *lead, R, C = x.shape
        return (x.new_empty(x.shape, dtype=FP8),
                x.new_empty((*lead, -(-R // group_rows), -(-C // _BLOCK)), dtype=torch.float32))

    @reg("kdarch_C::fp8_dequantize")
    def _(q, s, group_rows, out_dtype):
        R, C = q.shape
        if not q.is_contiguous() and q.stride(0) == 1 and q.stride(1) == R:  # a transposed q: a transposed out
            return torch.empty_strided((R, C), (1, R), dtype=out_dtype, device=q.device)
        return q.new_empty(q.shape, dtype=out_dtype)

    _registered = True


# ---- plain calls ------------------------------------------------------------------------------------------------

def routing(topk_ids_TK: Tensor, n_experts: int, pad_to: int = 1):
    """(counts_E, offsets_E1, sorted_idx_P, inv_idx_M), int64, as kdarch.kernels.moe_ref.routing_metadata_ref
    (pad_to > 1: segments padded to a multiple of pad_to, -1 in sorted_idx's pad slots)."""
    return _lib().moe_routing(topk_ids_TK, n_experts, pad_to)


def routing_metadata(topk_ids_TK: Tensor, n_experts: int):
    """The routing callable of the MoE compositions (unpadded)."""
    return _lib().moe_routing(topk_ids_TK, n_experts, 1)


def swiglu_forward(h_M2I: Tensor, w_M1: Tensor) -> Tensor:
    """y [M, I] = w * silu(gate) * up for h = [gate | up] [M, 2I] and fp32 routing weights w [M, 1], in h's dtype."""
    return _lib().swiglu_forward(h_M2I, w_M1.reshape(-1))


def swiglu_backward(grad_y_MI: Tensor, h_M2I: Tensor, w_M1: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(grad_h [M, 2I] in h's dtype, grad_w [M] fp32, y recomputed) from grad_y [M, I] fp32."""
    return _lib().swiglu_backward(grad_y_MI, h_M2I, w_M1.reshape(-1))


def quantize(x: Tensor, group_rows: int, amax_floor: float, pow2_scale: bool):
    return _lib().fp8_quantize(x, group_rows, amax_floor, pow2_scale)


def dequantize(q: Tensor, s: Tensor, group_rows: int, out_dtype: torch.dtype = torch.float32) -> Tensor:
    return _lib().fp8_dequantize(q, s, group_rows, out_dtype)


# ---- differentiable permute / un-permute -------------------------------------------------------------------------

class _Permute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, src_RH, sorted_idx_P, inv_idx_M, fan: int):
        ctx.save_for_backward(inv_idx_M)
        ctx.fan = fan
        return _lib().moe_permute(src_RH, sorted_idx_P, fan)

    @staticmethod
    def backward(ctx, grad_PH):
        (inv_idx_M,) = ctx.saved_tensors
        return _lib().moe_unpermute(grad_PH, inv_idx_M, ctx.fan, None, grad_PH.dtype), None, None, None


class _Unpermute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, src_PH, inv_idx_M, sorted_idx_P, K: int, weights_TK, out_dtype):
        ctx.save_for_backward(src_PH, inv_idx_M, sorted_idx_P, weights_TK)
        ctx.K, ctx.has_w = K, weights_TK is not None
        return _lib().moe_unpermute(src_PH, inv_idx_M, K, weights_TK, out_dtype)

    @staticmethod
    def backward(ctx, grad_TH):
        src_PH, inv_idx_M, sorted_idx_P, weights_TK = ctx.saved_tensors
        grad_src = grad_w = None
        if ctx.needs_input_grad[0]:
            # weights times the incoming gradient, rounded once to src's dtype
            grad_src = _lib().moe_permute(grad_TH, sorted_idx_P, ctx.K, weights_TK).to(src_PH.dtype)
        if ctx.has_w and ctx.needs_input_grad[4]:
            grad_w = _lib().moe_unpermute_weights_grad(grad_TH, src_PH, inv_idx_M, ctx.K).to(weights_TK.dtype)
        return grad_src, None, None, None, grad_w, None


def permute(src_RH: Tensor, sorted_idx_P: Tensor, inv_idx_M: Tensor, fan: int) -> Tensor:
    """out [P, H]: out[j] = src[sorted_idx[j] // fan] (zeros in pad slots); differentiable in src."""
    return _Permute.apply(src_RH, sorted_idx_P, inv_idx_M, fan)


def unpermute(src_PH: Tensor, inv_idx_M: Tensor, sorted_idx_P: Tensor, K: int, weights_TK: Tensor | None = None,
              out_dtype: torch.dtype | None = None) -> Tensor:
    """out [T, H] = sum_k weights[t, k] * src[inv_idx[t*K + k]] in fp32 (k in order); differentiable in src
    and weights. Without weights a plain sum of the K rows."""
    return _Unpermute.apply(src_PH, inv_idx_M, sorted_idx_P, K, weights_TK, out_dtype)
