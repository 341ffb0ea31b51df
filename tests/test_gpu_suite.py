"""The GPU suite's CPU-side parts: its tests are collected (and skipped without CUDA), the one command refuses
a machine without CUDA in one line, and its whole flow (tests, every benchmark, targets, summary) runs on the
CPU at small sizes with --device cpu, the GPU tests' own logic included."""
import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SUITE = ROOT / "benchmarks" / "gpu_suite.py"
pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine the suite itself runs")


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k != "KDARCH_GPU_SUITE_DEVICE"}
    return {**env, **extra}


def _run(*cmd, **env):
    return subprocess.run([sys.executable, *cmd], cwd=ROOT, env=_env(**env), capture_output=True, text=True,
                          timeout=600)


def test_gpu_tests_are_collected_and_skipped_without_cuda():
    listed = _run("-m", "pytest", "tests/gpu", "--collect-only", "-q", "-p", "no:cacheprovider")
    ids = [line for line in listed.stdout.splitlines() if "::" in line]
    assert listed.returncode == 0 and len(ids) >= 30, listed.stdout[-2000:]
    assert {i.split("::")[0] for i in ids} == {"tests/gpu/test_kernels_cuda.py", "tests/gpu/test_model_cuda.py"}
    ran = _run("-m", "pytest", "tests/gpu", "-q", "-p", "no:cacheprovider", "-rs")
    assert ran.returncode == 0 and f"{len(ids)} skipped" in ran.stdout and "needs a CUDA device" in ran.stdout


def test_the_suite_refuses_a_machine_without_cuda():
    out = _run(str(SUITE))
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [out.stderr.strip()] and "expected a CUDA device" in out.stderr


def test_the_whole_suite_runs_on_the_cpu(tmp_path):
    """Every step on the CPU (the GPU tests at small sizes, except the slow compile ones): all succeed, and the
    summary and CSVs carry every step and target."""
    out = _run(str(SUITE), "--device", "cpu", "--tests-k", "not compile", "--results-dir", str(tmp_path))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    summary = (tmp_path / "summary.md").read_text()
    for step in ("tests", "fp8_gemm", "moe_dispatch", "distill_head", "train_step"):
        assert f"| {step} | ok |" in summary and (tmp_path / f"{step}.log").is_file()
    passed = int(summary.split("Tests: ")[1].split(" passed")[0])
    assert passed >= 25 and "0 failed" in summary
    for name in ("fp8_gemm", "moe_dispatch", "distill_head", "train_step"):
        with open(tmp_path / f"{name}.csv") as f:
            assert len(list(csv.DictReader(f))) > 0, name
    with open(tmp_path / "gpu_suite.csv") as f:
        goals = [r["x_value"] for r in csv.DictReader(f)]
    assert any("FP8 GEMM vs torch bf16" in g for g in goals) and any("fused head memory" in g for g in goals)
    assert any("MoE grouped GEMM" in g for g in goals)
    with open(tmp_path / "train_step.csv") as f:
        assert {r["provider"] for r in csv.DictReader(f)} == {"torch", "torch+fp8"}
