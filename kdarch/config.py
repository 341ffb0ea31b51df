"""ModelConfig: the one typed description of a kdarch student (or teacher).

Every architectural knob lives here, validated once in `__post_init__`, so the model code can trust
its config and users get an error that names the field instead of a shape mismatch deep inside a
matmul. Derived figures (parameter counts, KV-cache bytes) are computed from the config alone, which
lets users size a student before allocating it.
"""
from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdarch.checks import ConfigError, check, check_field_types, is_int


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of a DeepSeek-V3-style causal LM: MLA attention, DeepSeekMoE FFNs, MTP heads."""

    # --- sizes -------------------------------------------------------------------------------
    vocab_size: int = 32768
    """Number of token ids; embedding and output head rows."""
    hidden_size: int = 512
    """Model width d (residual stream)."""
    n_layers: int = 6
    """Number of transformer blocks in the main model (MTP blocks come on top)."""
    n_heads: int = 8
    """Attention heads."""
    max_seq_len: int = 2048
    """Longest sequence (prompt + generation) the model accepts."""

    # --- multi-head latent attention -----------------------------------------------------------
    q_lora_rank: int = 192
    """Rank of the low-rank query projection; 0 means a plain query projection d -> H*(nope+rope)."""
    kv_lora_rank: int = 128
    """Width of the compressed KV latent that the inference cache stores per token."""
    qk_nope_head_dim: int = 64
    """Per-head query/key width without rotary embedding."""
    qk_rope_head_dim: int = 32
    """Per-head query width with rotary embedding; keys share one rope slice of this width per token."""
    v_head_dim: int = 64
    """Per-head value width."""

    # --- rotary embedding (YaRN optional) -------------------------------------------------------
    rope_theta: float = 10000.0
    """RoPE base."""
    rope_factor: float = 1.0
    """YaRN context-extension factor; 1.0 disables YaRN."""
    rope_original_max_seq_len: int = 4096
    """Context length the rotary frequencies were trained for (YaRN only)."""
    rope_beta_fast: float = 32.0
    """YaRN: rotations per context above which a frequency is kept unscaled."""
    rope_beta_slow: float = 1.0
    """YaRN: rotations per context below which a frequency is fully interpolated."""
    rope_mscale: float = 1.0
    """YaRN: attention temperature coefficient; softmax scale gains (0.1*mscale*ln(factor)+1)^2."""

    # --- feed-forward ---------------------------------------------------------------------------
    intermediate_size: int = 1408
    """Width of the dense SwiGLU MLPs in the first `n_dense_layers` blocks."""
    n_dense_layers: int = 1
    """Number of leading blocks with a dense MLP instead of MoE (HF: first_k_dense_replace)."""
    moe_intermediate_size: int = 256
    """Width of one routed (and one shared) expert."""
    n_routed_experts: int = 16
    """Routed experts per MoE layer; 0 makes every block dense."""
    n_shared_experts: int = 1
    """Shared experts per MoE layer, fused into one MLP of width n_shared_experts*moe_intermediate_size."""
    num_experts_per_tok: int = 4
    """Routed experts chosen per token (top-k)."""
    n_group: int = 1
    """Expert groups for group-limited routing; 1 disables it."""
    topk_group: int = 1
    """Groups a token may route into (group-limited routing)."""
    score_func: str = "sigmoid"
    """Router affinity: "sigmoid" (DeepSeek-V3) or "softmax" (DeepSeek-V2)."""
    norm_topk_prob: bool = True
    """Normalise the chosen experts' weights to sum to one (before routed_scaling_factor)."""
    routed_scaling_factor: float = 1.0
    """Multiplier on the routed experts' combined output weights."""
    bias_update_speed: float = 0.001
    """Aux-loss-free balancing step gamma: each update moves a bias by gamma*sign(mean load - load)."""
    seq_aux_loss_coef: float = 0.0
    """Coefficient alpha of the sequence-wise balance loss; 0 disables it."""

    # --- multi-token prediction -----------------------------------------------------------------
    n_mtp_modules: int = 1
    """Sequential MTP modules D; module k predicts token t+k+1. 0 disables MTP."""
    mtp_loss_weight: float = 0.3
    """lambda: the MTP loss (mean over depths) is added to the main CE with this weight."""

    # --- precision ----------------------------------------------------------------------------------
    fp8: bool = False
    """Run the blocks' linear layers and the routed experts in FP8 (e4m3; activations and gradients in
    1x128 tiles, weights in 128x128 blocks; fp32/bf16 master weights). The embedding, output head,
    router, norms and attention core stay in high precision, as in DeepSeek-V3."""

    # --- misc -----------------------------------------------------------------------------------
    rms_norm_eps: float = 1e-6
    """Epsilon of the block, final and MTP RMSNorms (the q/kv latent norms always use 1e-6, as DeepSeek-V3)."""
    tie_word_embeddings: bool = False
    """Share the embedding matrix with the output head."""
    init_std: float = 0.02
    """Standard deviation of the normal weight init."""
    bos_token_id: int | None = None
    """Beginning-of-sequence token id, if the tokenizer has one."""
    eos_token_id: int | None = None
    """End-of-sequence token id; `generate` stops a row when it is produced."""

    # ------------------------------------------------------------------------------------------
    def __post_init__(self) -> None:
        check_field_types(self, "ModelConfig")  # types first: "two" layers is named, not compared with 0
        for name in ("vocab_size", "hidden_size", "n_layers", "n_heads", "max_seq_len", "kv_lora_rank",
                     "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "intermediate_size",
                     "rope_original_max_seq_len"):
            self._at_least(name, 1)
        for name in ("q_lora_rank", "n_dense_layers", "n_routed_experts", "n_shared_experts", "n_mtp_modules",
                     "mtp_loss_weight"):
            self._at_least(name, 0)
        _check(self.qk_rope_head_dim % 2 == 0, "qk_rope_head_dim", "an even number (rope rotates pairs)",
               self.qk_rope_head_dim)
        for name in ("rope_theta", "rms_norm_eps", "init_std"):
            _check(getattr(self, name) > 0, name, "a number > 0", getattr(self, name))
        self._at_least("rope_factor", 1, "(1.0 disables YaRN)")
        _check(self.n_dense_layers <= self.n_layers, "n_dense_layers", f"<= n_layers={self.n_layers}",
               self.n_dense_layers)
        for name in ("bos_token_id", "eos_token_id"):
            tok = getattr(self, name)
            _check(tok is None or 0 <= tok < self.vocab_size, name, f"None or a token id in [0, {self.vocab_size})",
                   tok)
        if self.has_moe:
            self._at_least("moe_intermediate_size", 1)
            _check(self.score_func in ("sigmoid", "softmax"), "score_func", "one of 'sigmoid', 'softmax'",
                   self.score_func)
            _check(1 <= self.num_experts_per_tok <= self.n_routed_experts, "num_experts_per_tok",
                   f"an int in [1, n_routed_experts={self.n_routed_experts}]", self.num_experts_per_tok)
            _check(self.n_group >= 1 and self.n_routed_experts % self.n_group == 0, "n_group",
                   f"a divisor of n_routed_experts={self.n_routed_experts}", self.n_group)
            _check(1 <= self.topk_group <= self.n_group, "topk_group", f"an int in [1, n_group={self.n_group}]",
                   self.topk_group)
            _check(self.topk_group * (self.n_routed_experts // self.n_group) >= self.num_experts_per_tok,
                   "topk_group", f"large enough that topk_group*experts_per_group >= num_experts_per_tok="
                   f"{self.num_experts_per_tok}", self.topk_group)
            _check(self.routed_scaling_factor > 0, "routed_scaling_factor", "a number > 0",
                   self.routed_scaling_factor)
            for name in ("bias_update_speed", "seq_aux_loss_coef"):
                self._at_least(name, 0)

    def _at_least(self, name: str, lo: float, note: str = "") -> None:
        v = getattr(self, name)
        _check(v >= lo, name, f"{'an int' if is_int(v) else 'a number'} >= {lo:g}{' ' + note if note else ''}", v)

    # --- derived shapes -------------------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def has_moe(self) -> bool:
        return self.n_routed_experts > 0 and self.n_layers > self.n_dense_layers

    def is_moe_layer(self, layer_id: int) -> bool:
        """Blocks with index >= n_dense_layers are MoE (MTP blocks take indices n_layers, n_layers+1, ...)."""
        return self.n_routed_experts > 0 and layer_id >= self.n_dense_layers

    @property
    def softmax_scale(self) -> float:
        scale = self.qk_head_dim ** -0.5
        if self.rope_factor > 1.0:
            mscale = 0.1 * self.rope_mscale * math.log(self.rope_factor) + 1.0
            scale *= mscale * mscale
        return scale

    # --- derived figures ------------------------------------------------------------------------
    def _attention_params(self) -> int:
        d, h = self.hidden_size, self.n_heads
        q = (d * self.q_lora_rank + self.q_lora_rank + self.q_lora_rank * h * self.qk_head_dim
             if self.q_lora_rank else d * h * self.qk_head_dim)
        kv = d * (self.kv_lora_rank + self.qk_rope_head_dim) + self.kv_lora_rank
        kv += self.kv_lora_rank * h * (self.qk_nope_head_dim + self.v_head_dim)
        return q + kv + h * self.v_head_dim * d

    def _block_params(self, layer_id: int, active: bool) -> int:
        d = self.hidden_size
        n = 2 * d + self._attention_params()
        if not self.is_moe_layer(layer_id):
            return n + 3 * d * self.intermediate_size
        expert = 3 * d * self.moe_intermediate_size
        routed = self.num_experts_per_tok if active else self.n_routed_experts
        return n + d * self.n_routed_experts + (routed + self.n_shared_experts) * expert

    def _count(self, active: bool, include_mtp: bool) -> int:
        d, v = self.hidden_size, self.vocab_size
        n = v * d + d + (0 if self.tie_word_embeddings else v * d)
        n += sum(self._block_params(i, active) for i in range(self.n_layers))
        if include_mtp:
            for k in range(self.n_mtp_modules):
                n += 3 * d + 2 * d * d + self._block_params(self.n_layers + k, active)
        return n

    def num_params(self, include_mtp: bool = True) -> int:
        """Total parameters (embedding and head counted once each unless tied)."""
        return self._count(active=False, include_mtp=include_mtp)

    def num_active_params(self, include_mtp: bool = False) -> int:
        """Parameters touched per token: shared + top-k routed experts, every dense part."""
        return self._count(active=True, include_mtp=include_mtp)

    def kv_cache_bytes_per_token(self, latent: bool = True, dtype_bytes: int = 2) -> int:
        """KV-cache bytes per token over all main layers: latent ([c_kv, k_rope]) or full-head (K and V)."""
        per_layer = (self.kv_lora_rank + self.qk_rope_head_dim if latent
                     else self.n_heads * (self.qk_head_dim + self.v_head_dim))
        return self.n_layers * per_layer * dtype_bytes

    def figures(self) -> dict[str, int]:
        """The sizes a report or `kdarch info` shows, under the names they use everywhere."""
        return {"params_total": self.num_params(), "params_active": self.num_active_params(),
                "kv_cache_bytes_per_token": self.kv_cache_bytes_per_token(latent=True),
                "kv_cache_bytes_per_token_full_heads": self.kv_cache_bytes_per_token(latent=False)}

    # --- serialisation --------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2, sort_keys=True)
        if path is not None:
            Path(path).write_text(text + "\n")
        return text

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"ModelConfig: unknown field(s) {unknown}; known fields are {sorted(known)}")
        return cls(**data)

    @classmethod
    def from_json(cls, text_or_path: str | Path) -> ModelConfig:
        p = Path(text_or_path) if not str(text_or_path).lstrip().startswith("{") else None
        text = p.read_text() if p is not None else str(text_or_path)
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"ModelConfig: not valid JSON ({p or 'string'}): {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"ModelConfig: expected a JSON object, got {type(data).__name__}")
        return cls.from_dict(data)

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)


def _check(ok: bool, name: str, expected: str, got: Any) -> None:
    check(ok, f"ModelConfig.{name}", expected, got, error=ConfigError)


# --- presets ------------------------------------------------------------------------------------
PRESETS: dict[str, Callable[[], ModelConfig]] = {}


def preset(fn: Callable[[], ModelConfig]) -> Callable[[], ModelConfig]:
    PRESETS[fn.__name__] = fn
    return fn


@preset
def debug() -> ModelConfig:
    """Seconds-fast model for tests: every feature on (q-LoRA, groups, shared expert, MTP)."""
    return ModelConfig(vocab_size=256, hidden_size=64, n_layers=2, n_heads=4, max_seq_len=128,
                       q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
                       intermediate_size=128, n_dense_layers=1, moe_intermediate_size=32, n_routed_experts=8,
                       n_shared_experts=1, num_experts_per_tok=2, n_group=2, topk_group=1,
                       routed_scaling_factor=1.5, n_mtp_modules=1)


@preset
def tiny() -> ModelConfig:
    """The embedded demo / distillation student: trains in minutes on two CPU cores."""
    return ModelConfig(vocab_size=4096, hidden_size=256, n_layers=4, n_heads=4, max_seq_len=512,
                       q_lora_rank=96, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
                       intermediate_size=768, n_dense_layers=1, moe_intermediate_size=128, n_routed_experts=16,
                       n_shared_experts=1, num_experts_per_tok=4, n_group=4, topk_group=2,
                       routed_scaling_factor=2.0, n_mtp_modules=1, mtp_loss_weight=0.3, tie_word_embeddings=True)


@preset
def bench() -> ModelConfig:
    """The end-to-end training benchmark's model (benchmarks/e2e_train.py)."""
    return ModelConfig(vocab_size=8192, hidden_size=512, n_layers=6, n_heads=8, max_seq_len=1024,
                       q_lora_rank=192, kv_lora_rank=128, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64,
                       intermediate_size=1408, n_dense_layers=1, moe_intermediate_size=256, n_routed_experts=16,
                       n_shared_experts=1, num_experts_per_tok=4, n_mtp_modules=0)


@preset
def small() -> ModelConfig:
    """A real small student: about 0.5B total, 100M active parameters per token."""
    return ModelConfig(vocab_size=32768, hidden_size=768, n_layers=12, n_heads=12, max_seq_len=4096,
                       q_lora_rank=256, kv_lora_rank=192, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64,
                       intermediate_size=2048, n_dense_layers=1, moe_intermediate_size=256, n_routed_experts=64,
                       n_shared_experts=1, num_experts_per_tok=6, n_group=8, topk_group=4,
                       routed_scaling_factor=2.5, n_mtp_modules=1, mtp_loss_weight=0.1, tie_word_embeddings=True)


def get_preset(name: str, **overrides: Any) -> ModelConfig:
    """A named preset, optionally with fields replaced."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; available presets: {sorted(PRESETS)}")
    return PRESETS[name]().replace(**overrides) if overrides else PRESETS[name]()
