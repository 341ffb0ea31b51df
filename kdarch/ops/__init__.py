"""kdarch.ops: the functional ops the model calls, each dispatched to a backend.

Why a layer here: the model names *what* to compute (`moe_ffn(...)`), never *how*; inputs
are validated once, with errors that say what was expected, and the implementation
(torch / triton / cpp) is picked by `kdarch.ops.backend` (per-call `backend=`, else
KDARCH_BACKEND, else auto per device).

Legend: T tokens, K experts per token (top-k), E experts, H hidden, I expert intermediate.
"""

from __future__ import annotations

import torch

from kdarch.ops import moe as _moe  # noqa: F401  (registers the "torch" backend)
from kdarch.ops import fp8 as _fp8  # noqa: F401  (registers the FP8 ops; API in kdarch.ops.fp8)
from kdarch.ops import moe_triton as _moe_triton  # noqa: F401  (registers the "triton" backend)
from kdarch.ops.backend import available_backends, register, resolve
from kdarch.ops.linear_ce import linear_cross_entropy

__all__ = ["available_backends", "linear_cross_entropy", "moe_ffn", "register", "resolve"]


def _check_moe_inputs(x_TH, topk_ids_TK, topk_weights_TK, w_gate_up_E2IH, w_down_EHI) -> None:
    def shape(t):
        return tuple(t.shape)

    names = ("x", "topk_ids", "topk_weights", "w_gate_up", "w_down")
    for name, t in zip(names, (x_TH, topk_ids_TK, topk_weights_TK, w_gate_up_E2IH, w_down_EHI)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"moe_ffn: {name} must be a torch.Tensor, got {type(t).__name__}")
    if x_TH.dim() != 2 or not x_TH.is_floating_point():
        raise ValueError(f"moe_ffn: x must be a 2-D float tensor [T, H], got {x_TH.dtype} {shape(x_TH)}")
    T, H = x_TH.shape
    if topk_ids_TK.dim() != 2 or topk_ids_TK.shape[0] != T or topk_ids_TK.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"moe_ffn: topk_ids must be int64/int32 [T={T}, K], got {topk_ids_TK.dtype} {shape(topk_ids_TK)}")
    K = topk_ids_TK.shape[1]
    if shape(topk_weights_TK) != (T, K) or not topk_weights_TK.is_floating_point():
        raise ValueError(f"moe_ffn: topk_weights must be a float tensor [T={T}, K={K}], got "
                         f"{topk_weights_TK.dtype} {shape(topk_weights_TK)}")
    if w_gate_up_E2IH.dim() != 3 or w_gate_up_E2IH.shape[2] != H or w_gate_up_E2IH.shape[1] % 2:
        raise ValueError(f"moe_ffn: w_gate_up must be [E, 2I, H={H}] (gate rows then up rows), "
                         f"got {shape(w_gate_up_E2IH)}")
    E, I = w_gate_up_E2IH.shape[0], w_gate_up_E2IH.shape[1] // 2
    if shape(w_down_EHI) != (E, H, I):
        raise ValueError(f"moe_ffn: w_down must be [E={E}, H={H}, I={I}], got {shape(w_down_EHI)}")
    for name, w in (("w_gate_up", w_gate_up_E2IH), ("w_down", w_down_EHI)):
        if w.dtype != x_TH.dtype:
            raise ValueError(f"moe_ffn: {name} dtype must match x ({x_TH.dtype}), got {w.dtype}")
    devices = {t.device for t in (x_TH, topk_ids_TK, topk_weights_TK, w_gate_up_E2IH, w_down_EHI)}
    if len(devices) != 1:
        raise ValueError(f"moe_ffn: all inputs must be on one device, got x on {x_TH.device}, topk_ids on "
                         f"{topk_ids_TK.device}, topk_weights on {topk_weights_TK.device}, w_gate_up on "
                         f"{w_gate_up_E2IH.device}, w_down on {w_down_EHI.device}")
    if topk_ids_TK.numel() and topk_ids_TK.device.type != "meta" and not torch.compiler.is_compiling():
        lo, hi = torch.aminmax(topk_ids_TK)
        if lo < 0 or hi >= E:  # one host sync; skipped under torch.compile
            raise ValueError(f"moe_ffn: topk_ids must lie in [0, E={E}), got values in [{int(lo)}, {int(hi)}]")


def moe_ffn(x_TH: torch.Tensor, topk_ids_TK: torch.Tensor, topk_weights_TK: torch.Tensor,
            w_gate_up_E2IH: torch.Tensor, w_down_EHI: torch.Tensor,
            backend: str | None = None, fp8: bool = False) -> torch.Tensor:
    """Routed-expert SwiGLU: out[t] = sum_k w[t,k] * down_e(silu(gate_e x_t) * up_e x_t).

    x [T, H]; topk_ids [T, K] int64/int32 with e = topk_ids[t, k] in [0, E);
    topk_weights [T, K] float (combined in fp32); w_gate_up [E, 2I, H] (gate rows, then up
    rows); w_down [E, H, I]. Returns [T, H] in x.dtype. Differentiable in x, topk_weights,
    w_gate_up and w_down. backend: "torch" | "triton" | "cpp" | "auto" | None (env
    KDARCH_BACKEND, else auto). fp8: run both expert GEMMs in FP8 (kdarch.ops.fp8), the backend
    choosing the FP8 GEMM kernels.
    """
    _check_moe_inputs(x_TH, topk_ids_TK, topk_weights_TK, w_gate_up_E2IH, w_down_EHI)
    if fp8:
        return _moe.moe_ffn_fp8(x_TH, topk_ids_TK, topk_weights_TK, w_gate_up_E2IH, w_down_EHI, backend=backend)
    fn = resolve("moe_ffn", backend, x_TH.device)
    return fn(x_TH, topk_ids_TK, topk_weights_TK, w_gate_up_E2IH, w_down_EHI)
