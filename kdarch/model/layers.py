"""Small building blocks shared by every kdarch block: RMSNorm, rotary embedding (YaRN optional), SwiGLU MLP.

RoPE follows DeepSeek: it rotates interleaved pairs (x[2i], x[2i+1]) of the decoupled rope slice only,
and YaRN rescales the low frequencies when the model runs past the context it was trained for.

Shape legend: B batch, T query tokens, S key tokens, H heads, D model width, R rope width.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from kdarch.config import ModelConfig
from kdarch.ops.fp8 import Fp8Linear


class _RMSNorm(torch.autograd.Function):
    """y = (x * rstd).to(x.dtype) * w with rstd = 1 / sqrt(mean(x^2) + eps) in fp32; backward keeps x and rstd only
    (autograd through the same expression also keeps the normalised x: one more [..., D] tensor per norm, the
    largest share of a block's saved activations after the projections' inputs)."""

    @staticmethod
    def forward(ctx, x, weight, eps: float):
        xf = x.float()
        rstd = torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)
        ctx.save_for_backward(x, rstd, weight)
        return (xf * rstd).to(x.dtype) * weight

    @staticmethod
    def backward(ctx, grad_y):
        x, rstd, weight = ctx.saved_tensors
        x_hat = x.float() * rstd
        grad_w = (grad_y * x_hat.to(x.dtype)).reshape(-1, x.shape[-1]).sum(dim=0) if ctx.needs_input_grad[1] else None
        g = (grad_y * weight).float()
        grad_x = rstd * (g - x_hat * (g * x_hat).mean(dim=-1, keepdim=True))
        return grad_x.to(x.dtype), grad_w.to(weight.dtype) if grad_w is not None else None, None


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
            return _RMSNorm.apply(x, self.weight, self.eps)
        xf = x.float()  # the same expression without an autograd.Function's dispatch (decode calls it ~1000x/token)
        return (xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


def _yarn_correction_dim(n_rotations: float, dim: int, base: float, max_seq_len: int) -> float:
    """Index of the rope pair that turns `n_rotations` times over `max_seq_len` positions."""
    return dim * math.log(max_seq_len / (n_rotations * 2 * math.pi)) / (2 * math.log(base))


def rope_frequencies(cfg: ModelConfig) -> torch.Tensor:
    """Angular frequency of each rope pair, [R/2] fp32, with YaRN interpolation when rope_factor > 1."""
    dim, base = cfg.qk_rope_head_dim, cfg.rope_theta
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    if cfg.rope_factor > 1.0:
        low = max(math.floor(_yarn_correction_dim(cfg.rope_beta_fast, dim, base, cfg.rope_original_max_seq_len)), 0)
        high = min(math.ceil(_yarn_correction_dim(cfg.rope_beta_slow, dim, base, cfg.rope_original_max_seq_len)),
                   dim - 1)
        if low == high:
            high += 0.001
        ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
        keep = 1 - ramp  # 1 for fast (high-frequency) pairs, kept as they are; 0 for slow ones, interpolated
        freqs = freqs / cfg.rope_factor * (1 - keep) + freqs * keep
    return freqs.float()


def rope_table(cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin tables [max_seq_len, R/2] in fp32."""
    angles = torch.outer(torch.arange(cfg.max_seq_len, dtype=torch.float32), rope_frequencies(cfg))
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of x [B, T, (H,) R] by angles given as cos/sin [T, R/2] or [B, T, R/2]."""
    if x.dim() == 4:  # broadcast over heads
        cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    xf = x.float()
    x1, x2 = xf[..., 0::2], xf[..., 1::2]
    out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return out.flatten(-2).to(x.dtype)


def linear(in_dim: int, out_dim: int, fp8: bool = False) -> nn.Linear:
    """A bias-free projection; with fp8 its matmuls (forward, dX, dW) run in FP8 on the same parameters."""
    if fp8:
        return Fp8Linear(in_dim, out_dim, bias=False)
    return nn.Linear(in_dim, out_dim, bias=False)


class _SwiGLU(torch.autograd.Function):
    """silu(gate) * up of a [..., 2I] gate | up projection; backward keeps only that projection (autograd also
    keeps silu(gate), [..., I] more per MLP) and recomputes silu(gate), with the same kernels autograd runs, so
    the gradients are autograd's bit for bit."""

    @staticmethod
    def forward(ctx, gate_up):
        ctx.save_for_backward(gate_up)
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad_h):
        gate_up, = ctx.saved_tensors
        gate, up = gate_up.chunk(2, dim=-1)
        return torch.cat((torch.ops.aten.silu_backward(grad_h * up, gate), grad_h * F.silu(gate)), dim=-1)


class MLP(nn.Module):
    """SwiGLU MLP, down(silu(gate x) * up x), with gate and up fused into one projection (gate rows first)."""

    def __init__(self, dim: int, inter_dim: int, fp8: bool = False):
        super().__init__()
        self.w_gate_up = linear(dim, 2 * inter_dim, fp8)
        self.w_down = linear(inter_dim, dim, fp8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.w_gate_up(x)
        if torch.is_grad_enabled() and gate_up.requires_grad:
            return self.w_down(_SwiGLU.apply(gate_up))
        gate, up = gate_up.chunk(2, dim=-1)
        return self.w_down(F.silu(gate) * up)
