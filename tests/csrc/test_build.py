"""Building and loading the compiled ops: the cache, the fallbacks, and the CUDA sources compiled for sm_90.

The fallbacks run in subprocesses with an empty cache, so they really try (and fail) to build: without a
compiler, and with a compiler that fails. Either way kdarch imports, `auto` runs the torch backend, one
warning names the cause, and asking for "cpp" explicitly is a clear error.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils import cpp_extension

from kdarch.ops.cpp import build

FALLBACK = r'''
import json, warnings
import torch
with warnings.catch_warnings(record=True) as rec:
    warnings.simplefilter("always")
    from kdarch import ops
    x, ids, w = torch.randn(3, 8), torch.tensor([[0], [1], [1]]), torch.ones(3, 1)
    args = (x, ids, w, torch.randn(2, 16, 8), torch.randn(2, 8, 8))
    out = ops.moe_ffn(*args)
    q, s = ops.fp8.quantize_act(x)
    have = ops.available_backends("moe_ffn") + ops.available_backends("fp8_quantize")
    try:
        ops.moe_ffn(*args, backend="cpp")
        err = None
    except ValueError as e:
        err = str(e)
print(json.dumps({"shape": list(out.shape), "have": have, "err": err,
                  "warnings": [str(r.message) for r in rec if "kdarch" in str(r.message)]}))
'''


def run_python(script: str, **env) -> subprocess.CompletedProcess:
    full = dict(os.environ, **env)
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=full)


@pytest.mark.parametrize("cxx, cause", [("/nonexistent/c++", "no C++ compiler ('/nonexistent/c++' is not on PATH"),
                                        ("false", "the build failed")])
def test_no_compiler_or_failed_build_warns_once_and_falls_back(tmp_path, cxx, cause):
    res = run_python(FALLBACK, CXX=cxx, KDARCH_CACHE_DIR=str(tmp_path), KDARCH_BACKEND="auto")
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got["shape"] == [3, 8] and "cpp" not in got["have"] and "torch" in got["have"]
    assert len(got["warnings"]) == 1 and cause in got["warnings"][0], got["warnings"]
    assert "the 'cpp' backend is off and 'auto' uses the 'torch' backend" in got["warnings"][0]
    assert got["err"].startswith("moe_ffn: backend: expected an available backend") and \
        "('cpp' is unavailable here), got 'cpp'" in got["err"]


def test_second_load_uses_the_cache(lib):
    """Another process with the same sources and torch finds the library in the cache: no toolchain call."""
    path = build.status()["path"]
    assert path.is_file() and path.parent.name.startswith(f"torch{torch.__version__.split('+')[0]}-")
    mtime = path.stat().st_mtime_ns
    script = ("from kdarch.ops.cpp import build; ok = build.load(); "
              "print(ok, build.status()['built'], build.status()['path'])")
    res = run_python(script)
    assert res.returncode == 0, res.stderr[-3000:]
    ok, built, where = res.stdout.split()
    # built == False: the library came from the cache, with no compiler run (timing it would only measure load)
    assert ok == "True" and built == "False" and where == str(path), res.stdout
    assert path.stat().st_mtime_ns == mtime


def test_cache_key_follows_the_sources(tmp_path):
    src = build.csrc_dir()
    copy = tmp_path / "csrc"
    shutil.copytree(src, copy)
    same = build._key(copy, build.SOURCES, False)
    assert same == build._key(src, build.SOURCES, False)
    (copy / "fp8_ops.cpp").write_text((copy / "fp8_ops.cpp").read_text() + "\n// edited\n")
    assert build._key(copy, build.SOURCES, False) != same


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on PATH")
def test_cuda_sources_compile_for_sm90(tmp_path):
    """Compile only (no GPU needed): both kernel files with nvcc for sm_90, and the torch-side glue's syntax."""
    src = build.csrc_dir()
    for cu in [f for f in build.CUDA_SOURCES if f.endswith(".cu")]:
        res = subprocess.run(["nvcc", "-arch=sm_90", "-O3", "--fmad=false", "-std=c++17", f"-I{src}", "-c",
                              str(src / cu), "-o", str(tmp_path / (Path(cu).stem + ".o"))],
                             capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, f"{cu}:\n{res.stderr[-3000:]}"
        assert (tmp_path / (Path(cu).stem + ".o")).stat().st_size > 0
    homes = [os.environ.get("CUDA_HOME") or "", cpp_extension.CUDA_HOME or "", "/usr/local/cuda",
             str(Path(shutil.which("nvcc")).resolve().parents[1])]
    cuda_include = next((Path(h) / "include" for h in homes if h and (Path(h) / "include/cuda_runtime.h").is_file()),
                        None)
    if cuda_include is None:
        pytest.skip("nvcc found, but no cuda_runtime.h beside it (set CUDA_HOME) for the glue's syntax check")
    includes = [f"-I{src}", *(f"-isystem{p}" for p in cpp_extension.include_paths()), f"-isystem{cuda_include}"]
    if not any((Path(p) / "c10/cuda/impl/cuda_cmake_macros.h").is_file() for p in cpp_extension.include_paths()):
        includes.append("-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE")  # a CPU build of torch lacks that generated header
    res = subprocess.run([os.environ.get("CXX", "c++"), "-std=c++20", "-fsyntax-only", *includes,
                          str(src / "cuda/cuda_ops.cpp")], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]


ROOT = Path(__file__).resolve().parents[2]


def _setup_build_py(tmp_path, **env):
    cmd = [sys.executable, "setup.py", "-q", "build_py", "--build-lib", str(tmp_path / "lib")]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, KDARCH_BUILD_EXT="1", **env))


def test_install_time_build_hook(lib, tmp_path):
    """KDARCH_BUILD_EXT=1 makes the package build (setup.py build_py) compile the ops from the package as laid
    out for installation, into the cache the first import reads (here already built: it only loads), and a
    build that cannot compile fails the install with the reason instead of installing without the ops."""
    done = _setup_build_py(tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"kdarch_C: ready at {build.status()['path']}" in done.stderr
    assert (tmp_path / "lib" / "kdarch" / "csrc" / "moe_ops.cpp").is_file()
    failed = _setup_build_py(tmp_path, CXX="/nonexistent/c++", KDARCH_CACHE_DIR=str(tmp_path / "cache"))
    assert failed.returncode != 0 and "no C++ compiler" in failed.stderr
    assert "KDARCH_BUILD_EXT=1: the csrc/ ops did not build" in failed.stderr
    without = subprocess.run([sys.executable, "setup.py", "-q", "build_py", "--build-lib", str(tmp_path / "plain")],
                             cwd=ROOT, capture_output=True, text=True, timeout=600,
                             env={k: v for k, v in os.environ.items() if k != "KDARCH_BUILD_EXT"})
    assert without.returncode == 0 and "kdarch_C" not in without.stderr
