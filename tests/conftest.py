"""Test-wide set-up: without a GPU, Triton kernels run under the interpreter (set before triton loads), and
every value check runs (KDARCH_CHECKS=1; see kdarch.checks)."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ["KDARCH_CHECKS"] = "1"
torch.set_num_threads(min(2, torch.get_num_threads()))
