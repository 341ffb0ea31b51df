"""FP8 linear layers for training: `fp8_linear`, `fp8_grouped_linear` and the `Fp8Linear` module.

Why a layer of its own: the model should say "this projection runs in FP8" and never deal with tiles,
scales or backends. The autograd Function here is written once over the registry's FP8 ops (quantise,
block-scaled GEMM, grouped and K-grouped GEMM), resolved once per call, so every backend gets the same
recipe and torch.compile sees only custom ops on the Triton path.

The recipe (DeepSeek-V3 §3.3): forward Y = X Wᵀ with X in 1×128 tiles and W in 128×128 blocks;
backward dX = dY W with dY in 1×128 tiles (along N) and the forward's quantised W reused transposed
(square blocks are why), dW = dYᵀ X with dY and X quantised in 1×128 tiles along the *token* dim
(DeepSeek's "128×1"). Gradients are never quantised in 128×128 blocks (that diverged for DeepSeek).
The forward saves fp8 copies (W, and Xᵀ quantised along tokens), not X. Master weights stay fp32 /
bf16 and get their gradient in that dtype; every GEMM accumulates in fp32.

This module also holds the few input-check helpers the FP8 functional API (kdarch.ops.fp8) shares
with the linears, so that the package's __init__ imports from here and never the other way round.

Legend: M tokens (rows), K in-features, N out-features, E experts; *_q e4m3fn data, *_s fp32 scales.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from kdarch.checks import check, tensor_arg, value_checks_on
from kdarch.kernels.fp8_ref import AMAX_FLOOR, BLOCK, GRAD_AMAX_FLOOR
from kdarch.ops.backend import resolve

OUT_DTYPES = (torch.bfloat16, torch.float32)  # what the FP8 GEMMs write
_OFFSET_DTYPES = (torch.int64, torch.int32)


# ---- input checks shared with the functional API ------------------------------------------------------------

def float_arg(name: str, t, dims: tuple[int, ...], shape: str) -> torch.Tensor:
    """t is a high-precision float tensor (not already fp8) with one of `dims` dimensions; `shape` for the message."""
    check(isinstance(t, torch.Tensor), name, "a torch.Tensor", t, error=TypeError)
    check(t.is_floating_point() and t.element_size() > 1 and t.dim() in dims, name,
          f"a float tensor {shape} (fp32, bf16 or fp16)", t)
    return t


def offsets_arg(name: str, offs, E: int, M: int, device: torch.device) -> torch.Tensor:
    """Segment offsets [E+1] on `device`: shape and dtype always; their values (0 first, never decreasing, M
    last: a host sync) only where kdarch.checks.value_checks_on says so."""
    tensor_arg(name, offs, dtypes=_OFFSET_DTYPES, shape=(E + 1,),
               what=f"an int64/int32 tensor [E+1={E + 1}] (segment starts, then the end)")
    check(offs.device == device, name, f"a tensor on {device} (with the rows it segments)", offs.device)
    if offs.numel() and value_checks_on(offs):
        o = offs.tolist()
        check(o[0] == 0 and o[-1] == M and all(a <= b for a, b in zip(o, o[1:])), name,
              f"offsets that start at 0, never decrease and end at the row count {M}", o)
    return offs


# ---- autograd -------------------------------------------------------------------------------------------------

class _Ops:
    """The FP8 ops of one call, resolved once (per-call backend, else KDARCH_BACKEND, else auto)."""

    def __init__(self, backend: str | None, device: torch.device):
        for op in ("fp8_quantize", "fp8_gemm", "fp8_grouped_gemm", "fp8_kgrouped_gemm"):
            setattr(self, op, resolve(op, backend, device))

    def act(self, x, floor=AMAX_FLOOR):
        return self.fp8_quantize(x, 1, floor, False)

    def weight(self, w):
        return self.fp8_quantize(w, BLOCK, AMAX_FLOOR, False)


def _mm(ops: _Ops, a, b, offs_E1, dtype):
    """(a_q, a_s) · (b_q, b_s)ᵀ, per expert segment when offsets are given; returned in `dtype`."""
    dt = dtype if dtype in OUT_DTYPES else torch.float32
    y = ops.fp8_gemm(*a, *b, BLOCK, dt) if offs_E1 is None else ops.fp8_grouped_gemm(*a, *b, offs_E1, dt)
    return y.to(dtype)


class _Fp8LinearFn(torch.autograd.Function):
    """Y = X·Wᵀ with W [N, K], or per expert segment (offsets [E+1]) with W [E, N, K], all GEMMs in FP8."""

    @staticmethod
    def forward(ctx, x_MK, w, offs_E1, ops: _Ops):
        w_q, w_s = ops.weight(w)
        y = _mm(ops, ops.act(x_MK), (w_q, w_s), offs_E1, x_MK.dtype)
        need_dx, need_dw = ctx.needs_input_grad[:2]
        ctx.ops, ctx.dtypes = ops, (x_MK.dtype, w.dtype)
        xt = ops.act(x_MK.t()) if need_dw else (None, None)  # Xᵀ [K, M] in 1×128 tiles along tokens
        ctx.save_for_backward(offs_E1, *((w_q, w_s) if need_dx else (None, None)), *xt)
        return y

    @staticmethod
    def backward(ctx, dy_MN):
        offs_E1, w_q, w_s, xt_q, xt_s = ctx.saved_tensors
        ops, (x_dtype, w_dtype) = ctx.ops, ctx.dtypes
        dx = dw = None
        if ctx.needs_input_grad[0]:  # dX = dY·W: dY in 1×128 tiles along N; Wᵀ's 128×128 blocks are W's
            wt = (w_q.transpose(-1, -2), w_s.transpose(-1, -2))
            dx = _mm(ops, ops.act(dy_MN, GRAD_AMAX_FLOOR), wt, offs_E1, x_dtype)
        if ctx.needs_input_grad[1]:  # dW = dYᵀ·X: dY and X both in 1×128 tiles along tokens
            g = ops.act(dy_MN.t(), GRAD_AMAX_FLOOR)
            dt = w_dtype if w_dtype in OUT_DTYPES else torch.float32
            dw = ops.fp8_gemm(*g, xt_q, xt_s, 1, dt) if offs_E1 is None else \
                ops.fp8_kgrouped_gemm(*g, xt_q, xt_s, offs_E1, dt)
            dw = dw.to(w_dtype)
        return dx, dw, None, None


def fp8_matmul(x_MK: torch.Tensor, w: torch.Tensor, offs_E1: torch.Tensor | None = None,
               backend: str | None = None) -> torch.Tensor:
    """The unchecked core of fp8_linear (offs_E1 None, w [N, K]) and fp8_grouped_linear (w [E, N, K]), for
    callers inside kdarch.ops whose operands are valid by construction (e.g. the FP8 MoE composition).
    Under autocast the FP8 recipe still sets every precision inside; X and the output take autocast's dtype,
    as a matmul's would."""
    device_type = x_MK.device.type
    if torch.is_autocast_enabled(device_type):
        x_MK = x_MK.to(torch.get_autocast_dtype(device_type))
        with torch.autocast(device_type, enabled=False):
            return fp8_matmul(x_MK, w, offs_E1, backend)
    ops = _Ops(backend, x_MK.device)
    if torch.is_grad_enabled() and (x_MK.requires_grad or w.requires_grad):
        return _Fp8LinearFn.apply(x_MK, w, offs_E1, ops)
    return _mm(ops, ops.act(x_MK), ops.weight(w), offs_E1, x_MK.dtype)  # inference: no backward operands


# ---- functional API and module --------------------------------------------------------------------------------

def _check_linear(name: str, x, x_dims: tuple[int, ...], x_shape: str, w, w_dim: int, w_shape: str) -> None:
    float_arg(f"{name}: x", x, x_dims, x_shape)
    float_arg(f"{name}: weight", w, (w_dim,), w_shape)
    check(x.shape[-1] == w.shape[-1], f"{name}: x", f"a last dimension of the weight's in_features K={w.shape[-1]}",
          x)
    check(x.device == w.device, f"{name}: weight", f"a tensor on x's device ({x.device})", w.device)


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """y [..., N] = x [..., K] @ weight [N, K]ᵀ through FP8 GEMMs (forward and backward), in x.dtype.

    weight is the master weight (fp32 or bf16); its gradient comes back in its own dtype.
    """
    _check_linear("fp8_linear", x, tuple(range(1, 9)), "[..., K]", weight, 2, "[N, K]")
    y = fp8_matmul(x.reshape(-1, x.shape[-1]), weight, None, backend)
    return y.view(*x.shape[:-1], weight.shape[0])


def fp8_grouped_linear(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor, *,
                       backend: str | None = None) -> torch.Tensor:
    """y[offs[e]:offs[e+1]] = x[offs[e]:offs[e+1]] @ weight[e]ᵀ in FP8, differentiable in x and weight.

    x [M, K] rows sorted by expert (contiguous layout, ragged segments), weight [E, N, K] master
    weights, offsets int64 [E+1] (moe routing's offsets_E1). dW per expert reduces over that expert's
    rows only; its 1×128 token tiles are global (a tile may straddle two segments).
    """
    _check_linear("fp8_grouped_linear", x, (2,), "[M, K]", weight, 3, "[E, N, K]")
    offsets_arg("fp8_grouped_linear: offsets", offsets, weight.shape[0], x.shape[0], x.device)
    return fp8_matmul(x, weight, offsets, backend)


class Fp8Linear(nn.Linear):
    """nn.Linear whose matmuls (forward, dX, dW) run in FP8; same constructor, parameters and state_dict.

    The weight (and bias) stay master parameters in their own dtype; the bias is added in the output
    dtype after the FP8 GEMM. `backend` picks the kdarch backend (None: KDARCH_BACKEND, else auto).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None,
                 backend: str | None = None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.backend = backend

    @classmethod
    def from_linear(cls, linear: nn.Linear, backend: str | None = None) -> Fp8Linear:
        """An Fp8Linear sharing `linear`'s parameters (no copy)."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features, new.backend = linear.in_features, linear.out_features, backend
        new.weight, new.bias = linear.weight, linear.bias
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = fp8_linear(x, self.weight, backend=self.backend)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", fp8=e4m3 1x128/128x128"
