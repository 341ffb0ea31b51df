"""Devices for the train script: one spelling ("auto", "cpu", "cuda", "cuda:N"), resolved and checked once.

The same code path runs on the CPU (where the test suite exercises it) and on a CUDA device: batches are
copied from pinned memory without blocking, bf16 autocast takes the device's type, CUDA matmuls may use TF32
unless the run asks to be deterministic, and peak memory is the allocator's own figure on CUDA (resident
memory, sampled, on the CPU, whose tensors the CUDA allocator never sees).
"""
from __future__ import annotations

import os
import re
import threading
import warnings

import torch

from kdarch.checks import ConfigError

__all__ = ["DEVICE_SPEC", "PeakMemory", "autocast", "check_device", "resolve_device", "to_device"]

DEVICE_SPEC = re.compile(r"auto|cpu|cuda(:\d+)?")
_FP8_EMULATION_NOTED = False


def check_device(spec: str, name: str) -> None:
    """The spelling of a device field ("auto", "cpu", "cuda", "cuda:N"), and that the device exists here."""
    if not isinstance(spec, str) or not DEVICE_SPEC.fullmatch(spec):
        raise ConfigError(f"{name}: expected \"auto\", \"cpu\", \"cuda\" or \"cuda:N\", got {spec!r}")
    if spec.startswith("cuda"):
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = int(spec.partition(":")[2] or 0)
        if index >= count:
            have = f"{count} CUDA device(s)" if count else "no CUDA device"
            raise ConfigError(f"{name}: expected a device this machine has ({have}; \"cpu\" or \"auto\" work), got "
                              f"{spec!r}")


def resolve_device(spec: str) -> torch.device:
    """"auto" -> the first CUDA device when there is one, else the CPU; anything else as written."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(spec)


def resolve_dtype(spec: str, device: torch.device) -> torch.dtype:
    """"float32" / "bfloat16" as named; "auto": bfloat16 where matmuls run natively in it (CUDA, or a CPU with AMX
    or AVX512-BF16 — without them bf16 is emulated and slower than float32), else float32."""
    if spec != "auto":
        return getattr(torch, spec)
    native = device.type == "cuda" or (device.type == "cpu" and (torch.cpu._is_amx_tile_supported()
                                                                 or torch.cpu._is_avx512_bf16_supported()))
    return torch.bfloat16 if native else torch.float32


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host batch on `device`: from pinned memory without blocking on CUDA, as it is on the CPU."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def autocast(device: torch.device, dtype: str, fp8: bool = False):
    """bf16 autocast on the device's type (a no-op context for float32). FP8 on the CPU runs the torch
    backend's emulation of the FP8 GEMMs; say so once, since it is slower than fp32 there."""
    global _FP8_EMULATION_NOTED
    if fp8 and device.type == "cpu" and not _FP8_EMULATION_NOTED:
        _FP8_EMULATION_NOTED = True
        warnings.warn("model.fp8 on the CPU runs an emulation of the FP8 GEMMs (quantise, dequantise, fp32 "
                      "matmul): numerically the FP8 recipe, but slower than fp32; the Triton FP8 kernels run on "
                      "CUDA devices of compute capability 8.9+", stacklevel=3)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = not torch.are_deterministic_algorithms_enabled()
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bfloat16")


def device_label(device: torch.device | str) -> str:
    """"cpu", or "cuda:N (<GPU name>)": what the report says a model trained on."""
    device = torch.device(device)
    if device.type != "cuda":
        return device.type
    index = device.index if device.index is not None else torch.cuda.current_device()
    return f"cuda:{index} ({torch.cuda.get_device_name(index)})"


def _rss_mb() -> float:
    with open(f"/proc/{os.getpid()}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class PeakMemory:
    """Peak memory (MiB) while the `with` block runs: on a CUDA device the allocator's peak, else the process's
    resident set size, sampled every 10 ms."""

    def __init__(self, device: torch.device | str = "cpu", interval: float = 0.01):
        self.device, self.interval, self.peak_mb = torch.device(device), interval, 0.0
        self._stop = threading.Event()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak_mb = max(self.peak_mb, _rss_mb())
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return self
        self.peak_mb = _rss_mb()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            self.peak_mb = torch.cuda.max_memory_allocated(self.device) / 2**20
            return
        self._stop.set()
        self._thread.join()
        self.peak_mb = max(self.peak_mb, _rss_mb())
