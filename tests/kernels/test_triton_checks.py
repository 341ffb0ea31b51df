"""kdarch.kernels.triton_interpreting / triton_usable: the one place kdarch asks how Triton runs."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import triton

import kdarch.ops
from kdarch import kernels


@pytest.mark.parametrize("value, want", [("1", True), ("true", True), ("0", False), ("off", False)])
def test_interpreting_is_tritons_own_switch(monkeypatch, value, want):
    monkeypatch.setenv("TRITON_INTERPRET", value)
    assert kernels.triton_interpreting() is want and triton.knobs.runtime.interpret is want


def test_usable_needs_the_interpreter_or_a_gpu_of_the_capability(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert kernels.triton_usable() and kernels.triton_usable(min_capability=(99, 0))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert not kernels.triton_usable()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 0))
    assert kernels.triton_usable() and not kernels.triton_usable(min_capability=(8, 9))


def test_kdarch_imports_and_runs_without_triton():
    script = "\n".join([
        "import sys; sys.modules['triton'] = None  # an import of triton now fails",
        "import torch, kdarch",
        "from kdarch import kernels, ops",
        "assert not kernels.triton_interpreting() and not kernels.triton_usable()",
        "assert 'triton' not in ops.available_backends('moe_ffn') + ops.available_backends('moe_ffn_fp8')",
        "x, ids = torch.randn(3, 8), torch.tensor([[0], [1], [1]])",
        "print(tuple(ops.moe_ffn(x, ids, torch.ones(3, 1), torch.randn(2, 8, 8), torch.randn(2, 8, 4)).shape))",
    ])
    env = dict(os.environ, TRITON_INTERPRET="1")  # set, but triton is missing: nothing may claim to interpret
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0 and res.stdout.strip() == "(3, 8)", res.stderr[-3000:]


def test_no_other_interpreter_check_in_kernels_or_ops():
    """Only kdarch.kernels.triton_interpreting reads the switch; everything else asks it."""
    reads = re.compile(r"knobs\.runtime\.interpret|environ[^\n]*TRITON_INTERPRET|getenv\([^\n]*TRITON_INTERPRET")
    home = Path(kernels.__file__)
    for root in (home.parent, Path(kdarch.ops.__file__).parent):
        for path in root.rglob("*.py"):
            if path != home:
                assert not reads.search(path.read_text()), f"{path} reads TRITON_INTERPRET itself"
