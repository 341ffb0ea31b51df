"""Just-in-time build and load of kdarch's compiled ops (the `csrc/` sources), cached per machine.

Why JIT: the ops are small and the machines vary (CPU only, CUDA without a toolkit, no compiler at all), so
they are compiled where they run, the first time they are needed, with torch.utils.cpp_extension (ninja)
into `$KDARCH_CACHE_DIR/csrc/<key>/` (default `~/.cache/kdarch/csrc`). The key hashes the sources, the
flags, the torch / CUDA versions and the CPU (the build targets the host's instruction set), so a change to
any of them builds afresh and an unchanged tree loads the cached library without invoking the toolchain
at all (a marker file is written only after a load succeeded). A missing compiler, missing ninja, a missing
CUDA toolkit or a failed build never raise: `load()` returns False after one warning that names the cause,
and the `cpp` backend reports itself unavailable (explicit requests get the registry's error).

Knobs: KDARCH_CACHE_DIR (cache root), KDARCH_BUILD_VERBOSE=1 (show the compiler's output), CXX (the
compiler), MAX_JOBS (ninja's parallelism, read by torch), CUDA_HOME (the toolkit).

Ahead of time (e.g. in an image build): `python -m kdarch.ops.cpp` builds into the cache and says
where; it exits non-zero when the ops cannot be built.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import threading
import warnings
from pathlib import Path

import torch

from kdarch.checks import fail

__all__ = ["SOURCES", "CUDA_SOURCES", "cache_dir", "check_device", "cpp_available", "csrc_dir", "has_cuda_kernels",
           "load", "status"]

SOURCES = ("registration.cpp", "moe_ops.cpp", "swiglu_ops.cpp", "fp8_ops.cpp")
CUDA_SOURCES = ("cuda/cuda_ops.cpp", "cuda/moe_kernels.cu", "cuda/fp8_kernels.cu")
HEADERS = ("kdarch_C.h", "cuda/kernels.cuh")
# no FMA contraction: sums round as the references do; no trapping math: compares may become selects, so loops with
# a clamp vectorise (IEEE results unchanged)
CFLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-fno-trapping-math")
CUDA_CFLAGS = ("-O3", "--fmad=false")

_lock = threading.Lock()
_state: dict = {"loaded": False, "cause": None, "cuda": False, "path": None, "built": False}


def csrc_dir() -> Path | None:
    """The csrc/ sources: the repository's (a checkout or editable install) or the installed package data."""
    here = Path(__file__).resolve()
    for d in (here.parents[3] / "csrc", here.parents[2] / "csrc"):
        if (d / SOURCES[0]).is_file():
            return d
    return None


def cache_dir() -> Path:
    root = os.environ.get("KDARCH_CACHE_DIR") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache",
                                                      "kdarch")
    return Path(root) / "csrc"


def _cpu_id() -> str:
    """The host CPU's model and instruction-set flags (the build uses -march=native)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    return "\n".join(next((ln for ln in lines if ln.startswith(k)), "") for k in ("model name", "flags"))


def _key(src: Path, files: tuple[str, ...], with_cuda: bool) -> str:
    h = hashlib.sha256()
    for name in (*files, *HEADERS):
        p = src / name
        h.update(name.encode() + b"\0" + (p.read_bytes() if p.is_file() else b"") + b"\0")
    for part in (CFLAGS, CUDA_CFLAGS if with_cuda else (), (torch.__version__, str(torch.version.cuda)),
                 (platform.machine(), _cpu_id())):
        h.update(repr(part).encode())
    return f"torch{torch.__version__.split('+')[0]}-{h.hexdigest()[:16]}"


class _Unavailable(Exception):
    """Why the compiled ops cannot be had here (the text of the warning)."""


def _first_error(message: str) -> str:
    lines = [ln.strip() for ln in message.splitlines() if ln.strip()]
    pick = next((ln for ln in lines if "error" in ln.lower() and "Error building" not in ln), lines[-1] if lines
                else "unknown error")
    return pick[:240]


def _want_cuda() -> bool:
    """Build the CUDA kernels: torch has CUDA and a toolkit is installed (warned about once when missing)."""
    if torch.version.cuda is None:
        return False
    from torch.utils import cpp_extension  # lazy: imports setuptools

    if cpp_extension.CUDA_HOME is None:
        warnings.warn("kdarch: no CUDA toolkit found (set CUDA_HOME, or put nvcc on PATH); the compiled 'cpp' "
                      "ops are built for the CPU only", RuntimeWarning, stacklevel=4)
        return False
    return True


def _build() -> Path:
    src = csrc_dir()
    if src is None:
        raise _Unavailable("the csrc/ sources are not installed with this copy of kdarch")
    with_cuda = _want_cuda()
    files = SOURCES + (CUDA_SOURCES if with_cuda else ())
    key = _key(src, files, with_cuda)
    out = cache_dir() / key
    name = "kdarch_C_" + key.rsplit("-", 1)[1]
    lib, marker = out / f"{name}.so", out / "loaded.ok"
    _state["cuda"] = with_cuda
    if lib.is_file() and marker.is_file():
        return lib
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        raise _Unavailable(f"no C++ compiler ({cxx!r} is not on PATH; install g++ or set CXX)")
    from torch.utils import cpp_extension  # lazy: imports setuptools

    if not cpp_extension.is_ninja_available():
        raise _Unavailable("ninja is not installed (pip install ninja)")
    out.mkdir(parents=True, exist_ok=True)
    try:
        cpp_extension.load(name=name, sources=[str(src / f) for f in files], extra_cflags=list(CFLAGS),
                           extra_cuda_cflags=list(CUDA_CFLAGS), extra_include_paths=[str(src)],
                           build_directory=str(out), verbose=os.environ.get("KDARCH_BUILD_VERBOSE") == "1",
                           with_cuda=with_cuda, is_python_module=False)
    except Exception as e:  # a failed compile or link: a RuntimeError carrying the compiler's output
        raise _Unavailable(f"the build failed: {_first_error(str(e))} (KDARCH_BUILD_VERBOSE=1 shows the log)") from e
    _state["built"] = True
    return lib


def load() -> bool:
    """Load the kdarch_C ops (building them first if needed); True when they can run here. Never raises."""
    if _state["loaded"] or _state["cause"] is not None:
        return _state["loaded"]
    with _lock:
        if _state["loaded"] or _state["cause"] is not None:
            return _state["loaded"]
        try:
            lib = _build()
            if not _state["built"]:
                torch.ops.load_library(str(lib))  # cached: no toolchain call at all
            from kdarch.ops.cpp import ops  # registers the fake kernels (needs the schemas just loaded)

            ops.register_fakes()
            (lib.parent / "loaded.ok").touch()
            _state.update(loaded=True, path=lib)
        except Exception as e:
            _state["cause"] = str(e) if isinstance(e, _Unavailable) else f"loading failed: {e}"
            warnings.warn(f"kdarch: the compiled 'cpp' ops are unavailable: {_state['cause']}; the 'cpp' backend is "
                          "off and 'auto' uses the 'torch' backend", RuntimeWarning, stacklevel=3)
    return _state["loaded"]


def has_cuda_kernels() -> bool:
    """The loaded library has CUDA kernels (torch with CUDA and a toolkit at build time)."""
    return load() and _state["cuda"]


def cpp_available() -> bool:
    """The compiled ops load here (built on first use; one warning and False without a compiler): the `cpp`
    backends' availability."""
    return load()


def check_device(op: str, t: torch.Tensor) -> None:
    """The cpp kernels run on the CPU, and on CUDA where the library was built with its CUDA kernels."""
    if t.device.type == "cpu" or (t.device.type == "cuda" and has_cuda_kernels()):
        return
    fail(f"{op}: backend 'cpp'", "CPU tensors (or CUDA tensors, with the CUDA kernels built: torch with CUDA "
         "and a CUDA toolkit)", t.device)


def status() -> dict:
    """What load() found: loaded, the library path, whether this process compiled it, the cause when not."""
    return {k: _state[k] for k in ("loaded", "path", "built", "cuda", "cause")}

