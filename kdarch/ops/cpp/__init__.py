"""kdarch.ops.cpp: the compiled ops of csrc/ (torch library `kdarch_C`), which the `cpp` backends build on.

Why a backend of its own: on the CPU (and in small-batch GPU work) the routing metadata, the token permute /
combine and FP8 quantisation are many small PyTorch ops whose overhead outweighs their arithmetic; each is
one pass in C++ (OpenMP across rows, vectorised loops) or CUDA. The sources are compiled just in time and
cached (build.py); without a compiler the backend reports itself unavailable after one warning, and the
package works as before on the `torch` backend.

    build.py         JIT build + cache + the one warning; `load()` says whether the ops can run here
    ops.py           fake kernels and the differentiable permute / un-permute
    __main__.py      `python -m kdarch.ops.cpp`: build into the cache ahead of first use

The backends live with their op families, like the torch and triton ones: kdarch.ops.moe.cpp_backend
(`moe_ffn` / `moe_ffn_fp8` on the cpp routing, permute and combine, expert GEMMs through torch._grouped_mm)
and kdarch.ops.fp8.cpp_backend (quantise / dequantise, and the FP8 GEMMs on the cpp dequantiser). This
package imports nothing of kdarch.ops, so those imports run one way.
"""
