"""kdarch.ops: the functional ops the model calls, each dispatched to a backend.

Why a layer here: the model names *what* to compute (`moe_ffn(...)`), never *how*; inputs are validated
once, with errors that say what was expected, and the implementation ("torch", "triton" or "cpp") is picked by
`kdarch.ops.backend` (per-call `backend=`, else KDARCH_BACKEND, else auto per device).

Every op family with several backends has the same files, in a subpackage of its own:
    __init__.py        the functional API and its input checks
    torch_backend.py   the "torch" backend (vectorised PyTorch, the CPU fast path)
    triton_backend.py  the "triton" backend: torch.library custom ops + fakes over kdarch.kernels
    cpp_backend.py     the "cpp" backend: the compiled csrc/ ops (loaded by kdarch.ops.cpp)
(`moe/`, `fp8/`, the latter with `linear.py` for the FP8 training layers). `linear_ce.py` has one backend and
stays one file. The references every backend is tested against are kdarch.kernels.*_ref. Importing this
package imports the subpackages, which registers their backends.
"""

from __future__ import annotations

from kdarch.ops import fp8, moe  # noqa: F401  (register their backends)
from kdarch.ops.backend import available_backends, register, resolve
from kdarch.ops.linear_ce import linear_cross_entropy
from kdarch.ops.moe import moe_ffn

__all__ = ["available_backends", "linear_cross_entropy", "moe_ffn", "register", "resolve"]
