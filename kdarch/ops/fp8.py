"""FP8 (e4m3fn) block-scaled ops of the DeepSeek-V3 recipe, and the FP8 linear layers built on them.

Why this file: the model should say "this projection runs in FP8" (`Fp8Linear`, `fp8_linear`,
`fp8_grouped_linear`) and never deal with tiles, scales or backends. Semantics are defined once, in
`kdarch.kernels.fp8_ref` (1×128 activation tiles, 128×128 weight blocks, scale = max(amax, floor)/448,
RNE, partial tiles for sizes that are not multiples of 128, inf/NaN poisons its tile).

Layering per op: Triton kernel + launcher (`kdarch.kernels.fp8`) -> `torch.library.custom_op` with a
fake (so torch.compile traces it) -> backend registry ("triton"; "torch" = vectorised PyTorch, the
CPU fast path: quantise with torch ops, dequantise + fp32 matmul, since torch._scaled_mm on the CPU
takes only per-tensor / per-row scales) -> autograd Functions -> functional API -> `Fp8Linear`.

Training (DeepSeek-V3 §3.3): forward Y = X Wᵀ with X in 1×128 tiles and W in 128×128 blocks;
backward dX = dY W with dY in 1×128 tiles (along N) and the forward's quantised W reused transposed
(square blocks are why), dW = dYᵀ X with dY and X quantised in 1×128 tiles along the *token* dim
(DeepSeek's "128×1"). Gradients are never quantised in 128×128 blocks (that diverged for DeepSeek).
The forward saves fp8 copies (W, and Xᵀ quantised along tokens), not X. Master weights stay fp32 /
bf16 and get their gradient in that dtype; every GEMM accumulates in fp32.

Legend: M tokens (rows), K in-features, N out-features, E experts; *_q e4m3fn data, *_s fp32 scales.
"""

from __future__ import annotations


import torch
import torch.nn as nn

from kdarch.kernels import fp8_ref as ref
from kdarch.kernels.fp8_ref import AMAX_FLOOR, BLOCK, GRAD_AMAX_FLOOR, cdiv
from kdarch.ops.backend import register, resolve, triton_usable

FP8 = torch.float8_e4m3fn
_OUT_DTYPES = (torch.bfloat16, torch.float32)
__all__ = ["AMAX_FLOOR", "GRAD_AMAX_FLOOR", "Fp8Linear", "dequantize", "fp8_gemm", "fp8_grouped_gemm",
           "fp8_grouped_linear", "fp8_linear", "quantize_act", "quantize_weight"]


# ---- "torch" backend: vectorised PyTorch (the reference quantiser is already vectorised) ----------------

def _dequant_torch(q_RC, s, group_rows, out_dtype=torch.float32):
    """Broadcast the scales over tile views where the shape allows, else use the reference."""
    R, C = q_RC.shape
    if C % BLOCK or (group_rows > 1 and R % BLOCK):
        return ref.dequantize_ref(q_RC, s, group_rows).to(out_dtype)
    q = q_RC.float().reshape(R // group_rows, group_rows, C // BLOCK, BLOCK)
    return (q * s[:, None, :, None]).reshape(R, C).to(out_dtype)


def _gemm_torch(a_q, a_s, b_q, b_s, b_group, out_dtype):
    return (_dequant_torch(a_q, a_s, 1) @ _dequant_torch(b_q, b_s, b_group).T).to(out_dtype)


def _segments(offs_E1):
    o = offs_E1.tolist()  # host values: the torch path is the CPU path
    return list(zip(o[:-1], o[1:]))


def _grouped_gemm_torch(a_q, a_s, b_q, b_s, offs_E1, out_dtype):
    a = _dequant_torch(a_q, a_s, 1)
    out = a.new_zeros(a.shape[0], b_q.shape[1])
    for e, (lo, hi) in enumerate(_segments(offs_E1)):
        if hi > lo:
            out[lo:hi] = a[lo:hi] @ _dequant_torch(b_q[e], b_s[e], BLOCK).T
    return out.to(out_dtype)


def _kgrouped_gemm_torch(a_q, a_s, b_q, b_s, offs_E1, out_dtype):
    a, b = _dequant_torch(a_q, a_s, 1), _dequant_torch(b_q, b_s, 1)
    return torch.stack([a[:, lo:hi] @ b[:, lo:hi].T for lo, hi in _segments(offs_E1)]).to(out_dtype)


def _quantize_torch(x, group_rows, amax_floor, pow2_scale):
    if x.dim() == 3:
        qs = [ref.quantize_ref(x_e, group_rows, amax_floor, pow2_scale) for x_e in x]
        return torch.stack([q for q, _ in qs]), torch.stack([s for _, s in qs])
    return ref.quantize_ref(x, group_rows, amax_floor, pow2_scale)


# ---- "triton" backend: custom ops (fakes give torch.compile the shapes) ----------------------------------

def _kernels():
    from kdarch.kernels import fp8 as k  # lazy: triton is a Linux-only dependency
    return k


@torch.library.custom_op("kdarch::fp8_quantize", mutates_args=())
def _quantize_op(x: torch.Tensor, group_rows: int, amax_floor: float,
                 pow2_scale: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return _kernels().quantize(x, group_rows, amax_floor, pow2_scale)


@_quantize_op.register_fake
def _(x, group_rows, amax_floor, pow2_scale):
    *lead, R, C = x.shape
    return x.new_empty(x.shape, dtype=FP8), x.new_empty((*lead, cdiv(R, group_rows), cdiv(C, BLOCK)),
                                                        dtype=torch.float32)


@torch.library.custom_op("kdarch::fp8_dequantize", mutates_args=())
def _dequantize_op(q: torch.Tensor, s: torch.Tensor, group_rows: int, out_dtype: torch.dtype) -> torch.Tensor:
    return _kernels().dequantize(q, s, group_rows, out_dtype)


@_dequantize_op.register_fake
def _(q, s, group_rows, out_dtype):
    return q.new_empty(q.shape, dtype=out_dtype)


@torch.library.custom_op("kdarch::fp8_gemm", mutates_args=())
def _gemm_op(a_q: torch.Tensor, a_s: torch.Tensor, b_q: torch.Tensor, b_s: torch.Tensor, b_group: int,
             out_dtype: torch.dtype) -> torch.Tensor:
    return _kernels().fp8_gemm(a_q, a_s, b_q, b_s, b_group, out_dtype)


@_gemm_op.register_fake
def _(a_q, a_s, b_q, b_s, b_group, out_dtype):
    return a_q.new_empty((a_q.shape[0], b_q.shape[0]), dtype=out_dtype)


@torch.library.custom_op("kdarch::fp8_grouped_gemm", mutates_args=())
def _grouped_gemm_op(a_q: torch.Tensor, a_s: torch.Tensor, b_q: torch.Tensor, b_s: torch.Tensor,
                     offs: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    return _kernels().fp8_grouped_gemm(a_q, a_s, b_q, b_s, offs, out_dtype)


@_grouped_gemm_op.register_fake
def _(a_q, a_s, b_q, b_s, offs, out_dtype):
    return a_q.new_empty((a_q.shape[0], b_q.shape[1]), dtype=out_dtype)


@torch.library.custom_op("kdarch::fp8_kgrouped_gemm", mutates_args=())
def _kgrouped_gemm_op(a_q: torch.Tensor, a_s: torch.Tensor, b_q: torch.Tensor, b_s: torch.Tensor,
                      offs: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    return _kernels().fp8_kgrouped_gemm(a_q, a_s, b_q, b_s, offs, out_dtype)


@_kgrouped_gemm_op.register_fake
def _(a_q, a_s, b_q, b_s, offs, out_dtype):
    return a_q.new_empty((offs.shape[0] - 1, a_q.shape[0], b_q.shape[0]), dtype=out_dtype)


def _triton_ok() -> bool:
    """Triton importable, and either the interpreter or a GPU with fp8 tensor cores (sm89+: Ada, Hopper, ...)."""
    return triton_usable(min_capability=(8, 9))


_BACKENDS = {  # op -> (torch fn, triton fn); one signature per op
    "fp8_quantize": (_quantize_torch, _quantize_op),
    "fp8_dequantize": (lambda q, s, g, dt: _dequant_torch(q, s, g, dt), _dequantize_op),
    "fp8_gemm": (_gemm_torch, _gemm_op),
    "fp8_grouped_gemm": (_grouped_gemm_torch, _grouped_gemm_op),
    "fp8_kgrouped_gemm": (_kgrouped_gemm_torch, _kgrouped_gemm_op),
}
for _op, (_t, _k) in _BACKENDS.items():
    register(_op, "torch", _t)
    register(_op, "triton", _k, available=_triton_ok)


# ---- input checks: errors say what was expected -----------------------------------------------------------

def _need(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def _check_float(name: str, t: torch.Tensor, dims: tuple[int, ...]) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    _need(t.is_floating_point() and t.dtype != FP8 and t.dim() in dims,
          f"{name} must be a {' or '.join(f'{d}-D' for d in dims)} float tensor (fp32/bf16/fp16), "
          f"got {t.dtype} {tuple(t.shape)}")


def _check_quantised(name: str, q: torch.Tensor, s: torch.Tensor, groups: tuple[int, ...]) -> int:
    """Validate (q, s) and return the scale's row group (1 or 128)."""
    _need(isinstance(q, torch.Tensor) and q.dtype == FP8 and q.dim() == 2,
          f"{name}_q must be a 2-D torch.float8_e4m3fn tensor, got {getattr(q, 'dtype', type(q))} "
          f"{tuple(getattr(q, 'shape', ()))}")
    R, C = q.shape
    _need(isinstance(s, torch.Tensor) and s.dtype == torch.float32 and s.dim() == 2 and s.shape[1] == cdiv(C, BLOCK),
          f"{name}_s must be fp32 [rows, ceil({C}/128)={cdiv(C, BLOCK)}], got "
          f"{getattr(s, 'dtype', type(s))} {tuple(getattr(s, 'shape', ()))}")
    try:
        g = ref.scale_group_rows(R, s.shape[0])
    except ValueError as err:
        raise ValueError(f"{name}_s: {err}") from None
    _need(g in groups or R == 1, f"{name}_s must be {'1×128 tiles' if groups == (1,) else '128×128 blocks'}: "
          f"expected {R if groups == (1,) else cdiv(R, BLOCK)} rows, got {s.shape[0]}")
    _need(s.device == q.device, f"{name}_s is on {s.device} but {name}_q on {q.device}")
    return g


def _check_out_dtype(out_dtype) -> None:
    _need(out_dtype in _OUT_DTYPES, f"out_dtype must be torch.bfloat16 or torch.float32, got {out_dtype}")


def _check_offsets(offs: torch.Tensor, E: int, M: int) -> None:
    _need(isinstance(offs, torch.Tensor) and offs.dtype in (torch.int64, torch.int32) and tuple(offs.shape) == (E + 1,),
          f"offsets must be int64/int32 [E+1={E + 1}] (segment starts, then the end), got "
          f"{getattr(offs, 'dtype', type(offs))} {tuple(getattr(offs, 'shape', ()))}")
    if offs.device.type != "meta" and not torch.compiler.is_compiling():  # one host sync
        o = offs.tolist()
        _need(o[0] == 0 and o[-1] == M and all(a <= b for a, b in zip(o, o[1:])),
              f"offsets must start at 0, never decrease and end at the row count {M}, got {o}")


# ---- functional API -----------------------------------------------------------------------------------------

def quantize_act(x: torch.Tensor, *, amax_floor: float = AMAX_FLOOR, pow2_scale: bool = False,
                 backend: str | None = None):
    """x [..., K] -> (q e4m3fn [..., K], scales fp32 [..., ceil(K/128)]), one scale per row per 128 columns."""
    _check_float("x", x, tuple(range(1, 9)))
    x2 = x.reshape(-1, x.shape[-1])
    q, s = resolve("fp8_quantize", backend, x.device)(x2, 1, float(amax_floor), bool(pow2_scale))
    return q.view(x.shape), s.view(*x.shape[:-1], s.shape[-1])


def quantize_weight(w: torch.Tensor, *, amax_floor: float = AMAX_FLOOR, pow2_scale: bool = False,
                    backend: str | None = None):
    """w [N, K] (or [E, N, K]) -> (q e4m3fn, same shape; scales fp32 [(E,) ceil(N/128), ceil(K/128)])."""
    _check_float("w", w, (2, 3))
    return resolve("fp8_quantize", backend, w.device)(w, BLOCK, float(amax_floor), bool(pow2_scale))


def dequantize(q: torch.Tensor, s: torch.Tensor, *, out_dtype: torch.dtype = torch.float32,
               backend: str | None = None) -> torch.Tensor:
    """q * scale for a 2-D (q, s) pair; the tile shape (1×128 or 128×128) is read from s's shape."""
    g = _check_quantised("x", q, s, (1, BLOCK))
    return resolve("fp8_dequantize", backend, q.device)(q, s, g, out_dtype)


def fp8_gemm(x_q: torch.Tensor, x_s: torch.Tensor, w_q: torch.Tensor, w_s: torch.Tensor,
             out_dtype: torch.dtype = torch.bfloat16, *, backend: str | None = None) -> torch.Tensor:
    """Y [M, N] = dequant(x) @ dequant(w)ᵀ, fp32 accumulation promoted every 128 K (DeepSeek kernel.py).

    x_q [M, K] e4m3fn with x_s [M, ceil(K/128)]; w_q [N, K] e4m3fn with w_s [ceil(N/128), ceil(K/128)]
    (128×128 blocks) or [N, ceil(K/128)] (1×128 tiles, as in the dW GEMM). Strided views are fine
    (e.g. w_q.t(), w_s.t() for the dX GEMM). out_dtype: torch.bfloat16 or torch.float32.
    """
    _check_quantised("x", x_q, x_s, (1,))
    b_group = _check_quantised("w", w_q, w_s, (1, BLOCK))
    _need(x_q.shape[1] == w_q.shape[1], f"fp8_gemm: x [M, K={x_q.shape[1]}] and w [N, K] disagree on K: "
          f"w is {tuple(w_q.shape)}")
    _need(x_q.device == w_q.device, f"fp8_gemm: x on {x_q.device}, w on {w_q.device}")
    _check_out_dtype(out_dtype)
    return resolve("fp8_gemm", backend, x_q.device)(x_q, x_s, w_q, w_s, b_group, out_dtype)


def fp8_grouped_gemm(x_q: torch.Tensor, x_s: torch.Tensor, w_q: torch.Tensor, w_s: torch.Tensor,
                     offsets: torch.Tensor, out_dtype: torch.dtype = torch.bfloat16, *,
                     backend: str | None = None) -> torch.Tensor:
    """Y[offs[e]:offs[e+1]] = dequant(x rows) @ dequant(w[e])ᵀ for the contiguous (expert-sorted) layout.

    x_q [M, K], x_s [M, ceil(K/128)]; w_q [E, N, K], w_s [E, ceil(N/128), ceil(K/128)] (from
    quantize_weight on [E, N, K]); offsets int64 [E+1] with offsets[0] = 0, offsets[E] = M
    (moe routing's offsets_E1). Segments may have any length, 0 included: no 128-row alignment.
    """
    _check_quantised("x", x_q, x_s, (1,))
    _need(w_q.dtype == FP8 and w_q.dim() == 3 and w_q.shape[2] == x_q.shape[1],
          f"fp8_grouped_gemm: w_q must be e4m3fn [E, N, K={x_q.shape[1]}], got {w_q.dtype} {tuple(w_q.shape)}")
    E, N, K = w_q.shape
    _need(w_s.dtype == torch.float32 and tuple(w_s.shape) == (E, cdiv(N, BLOCK), cdiv(K, BLOCK)),
          f"fp8_grouped_gemm: w_s must be fp32 [E={E}, {cdiv(N, BLOCK)}, {cdiv(K, BLOCK)}], got {w_s.dtype} "
          f"{tuple(w_s.shape)}")
    _check_offsets(offsets, E, x_q.shape[0])
    _check_out_dtype(out_dtype)
    return resolve("fp8_grouped_gemm", backend, x_q.device)(x_q, x_s, w_q, w_s, offsets, out_dtype)


# ---- autograd: FP8 linear layers -----------------------------------------------------------------------------

class _Ops:
    """The ops of one call, resolved once (per-call backend, else KDARCH_BACKEND, else auto)."""

    def __init__(self, backend: str | None, device: torch.device):
        for op in _BACKENDS:
            setattr(self, op, resolve(op, backend, device))

    def act(self, x, floor=AMAX_FLOOR):
        return self.fp8_quantize(x, 1, floor, False)

    def weight(self, w):
        return self.fp8_quantize(w, BLOCK, AMAX_FLOOR, False)


def _mm(ops: _Ops, a, b, offs_E1, dtype):
    """(a_q, a_s) · (b_q, b_s)ᵀ, per expert segment when offsets are given; returned in `dtype`."""
    dt = dtype if dtype in _OUT_DTYPES else torch.float32
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
            dt = w_dtype if w_dtype in _OUT_DTYPES else torch.float32
            dw = ops.fp8_gemm(*g, xt_q, xt_s, 1, dt) if offs_E1 is None else \
                ops.fp8_kgrouped_gemm(*g, xt_q, xt_s, offs_E1, dt)
            dw = dw.to(w_dtype)
        return dx, dw, None, None


def _linear(x_MK, w, offs_E1, backend):
    ops = _Ops(backend, x_MK.device)
    if torch.is_grad_enabled() and (x_MK.requires_grad or w.requires_grad):
        return _Fp8LinearFn.apply(x_MK, w, offs_E1, ops)
    return _mm(ops, ops.act(x_MK), ops.weight(w), offs_E1, x_MK.dtype)  # inference: no backward operands


def _check_linear(name, x, w, w_dims):
    _check_float("x", x, tuple(range(1, 9)))
    _check_float("weight", w, (w_dims,))
    _need(x.shape[-1] == w.shape[-1], f"{name}: x [..., K={x.shape[-1]}] and weight {tuple(w.shape)} disagree "
          f"on in_features K")
    _need(x.device == w.device, f"{name}: x on {x.device}, weight on {w.device}")


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """y [..., N] = x [..., K] @ weight [N, K]ᵀ through FP8 GEMMs (forward and backward), in x.dtype.

    weight is the master weight (fp32 or bf16); its gradient comes back in its own dtype.
    """
    _check_linear("fp8_linear", x, weight, 2)
    y = _linear(x.reshape(-1, x.shape[-1]), weight, None, backend)
    return y.view(*x.shape[:-1], weight.shape[0])


def fp8_grouped_linear(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor, *,
                       backend: str | None = None) -> torch.Tensor:
    """y[offs[e]:offs[e+1]] = x[offs[e]:offs[e+1]] @ weight[e]ᵀ in FP8, differentiable in x and weight.

    x [M, K] rows sorted by expert (contiguous layout, ragged segments), weight [E, N, K] master
    weights, offsets int64 [E+1] (moe routing's offsets_E1). dW per expert reduces over that expert's
    rows only; its 1×128 token tiles are global (a tile may straddle two segments).
    """
    _check_linear("fp8_grouped_linear", x, weight, 3)
    _need(x.dim() == 2, f"fp8_grouped_linear: x must be 2-D [M, K], got {tuple(x.shape)}")
    _check_offsets(offsets, weight.shape[0], x.shape[0])
    return _linear(x, weight, offsets, backend)


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
    def from_linear(cls, linear: nn.Linear, backend: str | None = None) -> "Fp8Linear":
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
