"""kdarch.ops.moe: the routed-expert FFN the model calls, `moe_ffn`, and its routing metadata.

Why a functional op: the model names *what* to compute (`moe_ffn(...)`), never *how*. Inputs are checked
once, here, with errors that say what was expected (kdarch.checks style); then the backend registry
(kdarch.ops.backend) picks the implementation: per-call `backend=`, else KDARCH_BACKEND, else auto per
device. The high-precision op is "moe_ffn", the FP8 one "moe_ffn_fp8"; both follow the same rules, and
each has a "torch" backend (torch_backend.py), a "triton" backend (triton_backend.py) and a "cpp" backend
(cpp_backend.py: the compiled csrc/ routing, permute and combine).

Checks of shapes, dtypes and devices are always on; the one check that reads values (expert ids in
range: a device -> host sync) runs only where `kdarch.checks.value_checks_on` says so.

Legend: T tokens, K experts per token (top-k), E experts, H hidden, I expert intermediate.
"""

from __future__ import annotations

import torch

from kdarch.checks import check, check_index_range, tensor_arg
from kdarch.ops.backend import resolve
from kdarch.ops.moe import cpp_backend as _cpp_backend  # noqa: F401  (registers the "cpp" backends)
from kdarch.ops.moe import triton_backend as _triton_backend  # noqa: F401  (registers both backends, torch first)
from kdarch.ops.moe.torch_backend import routing_metadata

__all__ = ["moe_ffn", "routing_metadata"]

_INT_IDS = (torch.int64, torch.int32)


def _check_inputs(x_TH, topk_ids_TK, topk_weights_TK, w_gate_up_E2IH, w_down_EHI) -> None:
    args = {"x": x_TH, "topk_ids": topk_ids_TK, "topk_weights": topk_weights_TK, "w_gate_up": w_gate_up_E2IH,
            "w_down": w_down_EHI}
    for name, t in args.items():
        check(isinstance(t, torch.Tensor), f"moe_ffn: {name}", "a torch.Tensor", t, error=TypeError)
    tensor_arg("moe_ffn: x", x_TH, dim=2, floating=True, what="a 2-D float tensor [T, H]")
    T, H = x_TH.shape
    tensor_arg("moe_ffn: topk_ids", topk_ids_TK, dtypes=_INT_IDS, shape=(T, None),
               what=f"an int64/int32 tensor [T={T}, K]")
    K = topk_ids_TK.shape[1]
    tensor_arg("moe_ffn: topk_weights", topk_weights_TK, floating=True, shape=(T, K),
               what=f"a float tensor [T={T}, K={K}]")
    gate_up = f"a tensor [E, 2I, H={H}] (gate rows, then up rows)"
    tensor_arg("moe_ffn: w_gate_up", w_gate_up_E2IH, shape=(None, None, H), what=gate_up)
    check(w_gate_up_E2IH.shape[1] % 2 == 0, "moe_ffn: w_gate_up", gate_up, w_gate_up_E2IH)
    E, I = w_gate_up_E2IH.shape[0], w_gate_up_E2IH.shape[1] // 2
    tensor_arg("moe_ffn: w_down", w_down_EHI, shape=(E, H, I), what=f"a tensor [E={E}, H={H}, I={I}]")
    for name in ("w_gate_up", "w_down"):
        check(args[name].dtype == x_TH.dtype, f"moe_ffn: {name}", f"the dtype of x ({x_TH.dtype})", args[name])
    devices = {name: str(t.device) for name, t in args.items()}
    check(len(set(devices.values())) == 1, "moe_ffn: inputs", "all on one device", devices)
    check_index_range("moe_ffn: topk_ids", topk_ids_TK, E, what="expert ids")  # a value check (host sync)


def moe_ffn(x_TH: torch.Tensor, topk_ids_TK: torch.Tensor, topk_weights_TK: torch.Tensor,
            w_gate_up_E2IH: torch.Tensor, w_down_EHI: torch.Tensor,
            backend: str | None = None, fp8: bool = False) -> torch.Tensor:
    """Routed-expert SwiGLU: out[t] = sum_k w[t,k] * down_e(silu(gate_e x_t) * up_e x_t).

    x [T, H]; topk_ids [T, K] int64/int32 with e = topk_ids[t, k] in [0, E); topk_weights [T, K] float
    (combined in fp32); w_gate_up [E, 2I, H] (gate rows, then up rows); w_down [E, H, I]. Returns [T, H]
    in x.dtype. Differentiable in x, topk_weights, w_gate_up and w_down.
    backend: "torch" | "triton" | "auto" | None (env KDARCH_BACKEND, else auto).
    fp8: run both expert GEMMs in FP8 (op "moe_ffn_fp8": 1x128 activation tiles, 128x128 weight blocks).
    """
    _check_inputs(x_TH, topk_ids_TK, topk_weights_TK, w_gate_up_E2IH, w_down_EHI)
    fn = resolve("moe_ffn_fp8" if fp8 else "moe_ffn", backend, x_TH.device)
    return fn(x_TH, topk_ids_TK, topk_weights_TK, w_gate_up_E2IH, w_down_EHI)
