"""The GPU validation suite: kdarch's kernels and hot paths on a CUDA device, each against its reference.

Every test in this folder is marked `cuda` and skipped without a CUDA device; `python benchmarks/gpu_suite.py`
runs them, then the benchmarks' GPU configurations. `KDARCH_GPU_SUITE_DEVICE=cpu` runs the same tests on the
CPU at small sizes (Triton under the interpreter): a check of the suite itself on a machine without a GPU.
Sizes come from the `sizes` fixture, the device from `dev`.
"""
import os
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
ON_CPU = os.environ.get("KDARCH_GPU_SUITE_DEVICE", "").strip().lower() == "cpu"


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="the GPU suite needs a CUDA device (KDARCH_GPU_SUITE_DEVICE=cpu checks it here)")
    for item in items:
        if HERE in item.path.parents:
            item.add_marker(pytest.mark.cuda)
            if not (ON_CPU or torch.cuda.is_available()):
                item.add_marker(skip)


@pytest.fixture
def dev() -> torch.device:
    return torch.device("cpu" if ON_CPU else "cuda")


@pytest.fixture
def sizes() -> dict:
    """GPU-scale problems on a GPU; the same code paths at interpreter scale on the CPU."""
    if ON_CPU:
        return dict(moe=(64, 64, 32, 8, 2), gemm=(130, 256, 384), grouped=[0, 1, 130, 5, 0, 64, 33],
                    head=(64, 32, 512), batch=(2, 16), steps=20, decode=6)
    return dict(moe=(4096, 1024, 512, 64, 6), gemm=(4096, 7168, 2048), grouped=[0, 1, 700, 3000, 0, 4096, 33, 128],
                head=(8192, 1024, 32768), batch=(8, 128), steps=20, decode=24)
