"""kdarch.kernels: Triton kernels, each beside the plain-PyTorch reference it is tested against.

Kernels never import the model or `kdarch.ops`; the model reaches them through `kdarch.ops`. This package
imports without triton (the references are plain PyTorch); only the kernel modules need it.

Whether Triton runs its interpreter is asked in one place, `triton_interpreting()`, which reads triton's own
switch (`triton.knobs.runtime.interpret`, i.e. TRITON_INTERPRET as triton parses it), so kdarch never
disagrees with triton about how a kernel will run.
"""

from __future__ import annotations

import torch

__all__ = ["triton_interpreting", "triton_usable"]


@torch.compiler.assume_constant_result  # torch.compile bakes the answer in rather than tracing the import
def triton_interpreting() -> bool:
    """Triton's interpreter is on (TRITON_INTERPRET): kernels run in Python on CPU tensors. False without triton."""
    try:
        import triton  # lazy: kdarch.kernels imports where triton is not installed
    except ImportError:
        return False
    return bool(triton.knobs.runtime.interpret)


def triton_usable(min_capability: tuple[int, int] | None = None) -> bool:
    """Triton can run kernels here: installed, and either its interpreter on or a CUDA GPU (of at least
    `min_capability`, e.g. (8, 9) for fp8 tensor cores)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    if triton_interpreting():
        return True
    return torch.cuda.is_available() and (min_capability is None
                                          or torch.cuda.get_device_capability() >= min_capability)
