"""The compiled ops are built once per machine (kdarch.ops.cpp.build caches them); every test here needs them.

Without a C++ compiler the tests that run the ops are skipped (test_build.py still checks the fallback);
with one, a build that fails is a test failure, not a skip.
"""
import os
import shutil

import pytest
import torch

from kdarch.ops.cpp import build


@pytest.fixture(scope="session")
def lib():
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        pytest.skip("no C++ compiler: the compiled ops cannot be built here")
    assert build.load(), build.status()["cause"]
    return torch.ops.kdarch_C


@pytest.fixture
def threads():
    """Run a body at a given thread count, then restore it."""
    saved = torch.get_num_threads()

    def at(n, fn, *args):
        torch.set_num_threads(n)
        try:
            return fn(*args)
        finally:
            torch.set_num_threads(saved)
    return at
