"""Test-wide set-up: without a GPU, Triton kernels run under the interpreter (set before triton loads), and
every value check runs (KDARCH_CHECKS=1; see kdarch.checks); the repository's own directory is not an import
path (its top-level kernels/, installed as kdarch.kernels, would shadow the `kernels` package transformers
imports)."""
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT]

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ["KDARCH_CHECKS"] = "1"
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture
def value_checks_off():
    """As on an accelerator: value checks (which read values by design) are off unless KDARCH_CHECKS=1."""
    from kdarch.checks import set_value_checks  # imported here: kdarch loads triton, which reads the env once
    set_value_checks(False)
    yield
    set_value_checks(None)
