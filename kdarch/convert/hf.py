"""Hugging Face DeepseekV3 interop: config.json + safetensors <-> `kdarch.CausalLM`.

Why: a distilled student should load in transformers and in the serving engines that read the same
DeepSeek-V3 checkpoint format, and a DeepseekV3 checkpoint should load as a kdarch model. Both describe
the same architecture, so the mapping is renaming plus splits and stacks, never new numerics:
- kdarch fuses gate and up rows of every SwiGLU ([2I, D], gate first) and stacks routed experts
  ([E, 2I, D], [E, D, I]); HF stores gate/up/down per expert on disk (`mlp.experts.{e}.*`) and fuses them
  in memory (`mlp.experts.gate_up_proj`, `down_proj`), both accepted on load;
- MTP module k is stored DeepSeek-style as the extra layer `model.layers.{n_layers+k}` (enorm, hnorm,
  eh_proj on [enorm(emb); hnorm(h)], shared_head.norm, copies of embedding and head, block keys);
- RoPE rotates interleaved pairs in both (HF `rope_interleave=True`), so no weight permutation.
What kdarch cannot compute exactly is refused with an error naming the HF field and value: a silently
different model is worse than no model. Weights are read from safetensors only, never from pickles.
"""
from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import torch

from kdarch.checks import optional_import
from kdarch.config import ConfigError, ModelConfig
from kdarch.io import read_json, read_safetensors, write_json, write_safetensors
from kdarch.model import CausalLM
from kdarch.model.state import check_state_dict, model_from_state_dict

__all__ = ["HF_MODEL_TYPE", "hf_config_to_kdarch", "hf_state_dict", "hf_to_kdarch_state_dict", "kdarch_config_to_hf",
           "load_hf", "save_hf", "to_hf_model"]

log = logging.getLogger(__name__)

HF_MODEL_TYPE = "deepseek_v3"
HF_ARCHITECTURE = "DeepseekV3ForCausalLM"
HF_WEIGHTS = "model.safetensors"
HF_INDEX = "model.safetensors.index.json"

# DeepseekV3Config defaults (transformers 5.x): a key missing from config.json means this value.
HF_DEFAULTS = {
    "vocab_size": 129280, "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048,
    "num_hidden_layers": 61, "num_attention_heads": 128, "num_key_value_heads": None, "n_shared_experts": 1,
    "n_routed_experts": 256, "routed_scaling_factor": 2.5, "kv_lora_rank": 512, "q_lora_rank": 1536,
    "qk_rope_head_dim": 64, "v_head_dim": 128, "qk_nope_head_dim": 128, "n_group": 8, "topk_group": 4,
    "num_experts_per_tok": 8, "first_k_dense_replace": 3, "norm_topk_prob": True, "hidden_act": "silu",
    "max_position_embeddings": 4096, "initializer_range": 0.02, "rms_norm_eps": 1e-6, "bos_token_id": 0,
    "eos_token_id": 1, "tie_word_embeddings": False, "rope_interleave": True, "attention_bias": False,
    "attention_dropout": 0.0,
}
# HF field -> ModelConfig field, same meaning and value.
DIRECT = {
    "vocab_size": "vocab_size", "hidden_size": "hidden_size", "intermediate_size": "intermediate_size",
    "moe_intermediate_size": "moe_intermediate_size", "num_hidden_layers": "n_layers",
    "num_attention_heads": "n_heads", "max_position_embeddings": "max_seq_len", "kv_lora_rank": "kv_lora_rank",
    "qk_nope_head_dim": "qk_nope_head_dim", "qk_rope_head_dim": "qk_rope_head_dim", "v_head_dim": "v_head_dim",
    "n_shared_experts": "n_shared_experts", "routed_scaling_factor": "routed_scaling_factor", "n_group": "n_group",
    "topk_group": "topk_group", "num_experts_per_tok": "num_experts_per_tok", "norm_topk_prob": "norm_topk_prob",
    "rms_norm_eps": "rms_norm_eps", "tie_word_embeddings": "tie_word_embeddings", "initializer_range": "init_std",
    "bos_token_id": "bos_token_id",
}
# HF fields with the one value kdarch computes (missing = that value).
FIXED = {"hidden_act": "silu", "attention_bias": False, "rope_interleave": True, "attention_dropout": 0.0,
         "scoring_func": "sigmoid", "moe_layer_freq": 1}
# Read by other fields' logic below.
HANDLED = {"model_type", "num_key_value_heads", "q_lora_rank", "n_routed_experts", "first_k_dense_replace",
           "num_nextn_predict_layers", "num_mtp_layers", "eos_token_id", "rope_theta", "rope_scaling",
           "rope_parameters", "original_max_position_embeddings", "topk_method", "seq_aux", "aux_loss_alpha",
           "quantization_config", "head_dim", "qk_head_dim", "kdarch_training"}
# Keys that do not change what the weights compute (bookkeeping, runtime or parallelism settings).
IGNORED = {"architectures", "transformers_version", "torch_dtype", "dtype", "_name_or_path", "use_cache",
           "pad_token_id", "output_router_logits", "pretraining_tp", "ep_size", "auto_map", "return_dict",
           "output_hidden_states", "output_attentions", "_attn_implementation_autoset"}
YARN_KEYS = {"rope_type", "type", "rope_theta", "factor", "original_max_position_embeddings", "beta_fast",
             "beta_slow", "mscale", "mscale_all_dim", "attention_factor", "truncate", "partial_rotary_factor"}
MOE_ONLY = ("moe_intermediate_size", "n_shared_experts", "routed_scaling_factor", "n_group", "topk_group",
            "num_experts_per_tok", "norm_topk_prob")
TRAINING_EXTRAS = ("bias_update_speed", "mtp_loss_weight", "fp8")  # kdarch-only knobs, kept under "kdarch_training"


def _refuse(field: str, value, why: str):
    raise ConfigError(f"Hugging Face DeepseekV3 config: {field}={value!r} is not supported by kdarch: {why}")


def _yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _mtp_count(hf: dict) -> int:
    a, b = hf.get("num_nextn_predict_layers"), hf.get("num_mtp_layers")
    if a is not None and b is not None and a != b:
        _refuse("num_mtp_layers", b, f"conflicts with num_nextn_predict_layers={a}")
    n = a if a is not None else (b if b is not None else 1)
    if not isinstance(n, int) or n < 0:
        _refuse("num_nextn_predict_layers", n, "expected an int >= 0")
    return n


def _rope_to_kdarch(hf: dict) -> dict:
    """Mirror transformers' reading (modeling_rope_utils): `rope_scaling` (old key) wins over `rope_parameters`,
    rope_theta comes from the dict, else the top level, else 1e4; `type` is the old name of `rope_type`."""
    old, new = hf.get("rope_scaling"), hf.get("rope_parameters")
    norm = lambda p: {"rope_type": "default", **{("rope_type" if k == "type" else k): v for k, v in p.items()
                                                  if k != "rope_theta"}}
    if old and new and norm(old) != norm(new):
        _refuse("rope_scaling", old, f"conflicts with rope_parameters={new!r}")
    p = dict(old or new or {})
    theta = p.get("rope_theta", hf.get("rope_theta", 10000.0))
    rope_type = p.get("rope_type", p.get("type", "default"))
    if p.get("partial_rotary_factor", 1.0) != 1.0:
        _refuse("rope_parameters.partial_rotary_factor", p["partial_rotary_factor"], "kdarch ropes the whole slice")
    out = {"rope_theta": float(theta)}
    if rope_type == "default":
        extra = sorted(set(p) - {"rope_type", "type", "rope_theta", "partial_rotary_factor"})
        if extra:
            _refuse("rope_parameters", p, f"keys {extra} are not used by the default rope")
        return out
    if rope_type != "yarn":
        _refuse("rope_parameters.rope_type", rope_type, "kdarch implements only 'default' and 'yarn'")
    extra = sorted(set(p) - YARN_KEYS)
    if extra:
        _refuse("rope_parameters", p, f"unknown yarn keys {extra}")
    max_pos = hf.get("max_position_embeddings", HF_DEFAULTS["max_position_embeddings"])
    orig = hf.get("original_max_position_embeddings", p.get("original_max_position_embeddings", max_pos))
    factor = p.get("factor")
    factor = max_pos / orig if factor is None else factor
    if factor < 1:
        _refuse("rope_parameters.factor", factor, "YaRN needs a factor >= 1")
    if not p.get("truncate", True):
        _refuse("rope_parameters.truncate", False, "kdarch rounds the YaRN correction range (truncate=True)")
    mscale, mscale_all = p.get("mscale"), p.get("mscale_all_dim")
    attn = p.get("attention_factor")  # transformers scales cos/sin by this; kdarch never does
    if attn is None:
        attn = (_yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all) if mscale and mscale_all
                else _yarn_mscale(factor))
    if not math.isclose(attn, 1.0, rel_tol=1e-9):
        _refuse("rope_parameters", p, f"it scales the rotary cos/sin by attention_factor={attn:.6g} (implied by "
                "factor/mscale/mscale_all_dim); kdarch puts the YaRN temperature only in the softmax scale "
                "(DeepSeek style: set mscale == mscale_all_dim, or attention_factor=1.0)")
    if int(orig) != orig:
        _refuse("rope_parameters.original_max_position_embeddings", orig, "expected an int")
    out.update(rope_factor=float(factor), rope_original_max_seq_len=int(orig),
               rope_beta_fast=float(p.get("beta_fast") or 32), rope_beta_slow=float(p.get("beta_slow") or 1),
               rope_mscale=float(mscale_all or 0.0))
    return out


def hf_config_to_kdarch(hf: dict) -> ModelConfig:
    """A Hugging Face DeepseekV3 config.json dict -> ModelConfig; refuses what kdarch cannot compute exactly."""
    unknown = sorted(set(hf) - set(DIRECT) - set(FIXED) - HANDLED - IGNORED)
    if unknown:
        raise ConfigError(f"Hugging Face DeepseekV3 config: unknown key(s) {unknown}; kdarch refuses keys it does "
                          f"not know rather than dropping them (known: {sorted(set(DIRECT) | set(FIXED) | HANDLED)}, "
                          f"ignored: {sorted(IGNORED)})")
    if hf.get("model_type", HF_MODEL_TYPE) != HF_MODEL_TYPE:
        _refuse("model_type", hf["model_type"], f"expected {HF_MODEL_TYPE!r}")
    h = {**HF_DEFAULTS, **hf}
    for key, want in FIXED.items():
        if key in h and h[key] != want:
            _refuse(key, h[key], f"kdarch computes only {key}={want!r}")
    if hf.get("quantization_config"):
        _refuse("quantization_config", hf["quantization_config"], "quantized checkpoints must be dequantized first")
    heads = h["num_attention_heads"]
    if h["num_key_value_heads"] not in (None, heads):
        _refuse("num_key_value_heads", h["num_key_value_heads"],
                f"MLA expands keys/values for every head; must equal num_attention_heads={heads}")
    if hf.get("head_dim") not in (None, h["qk_rope_head_dim"]):
        _refuse("head_dim", hf["head_dim"], f"HF derives it as qk_rope_head_dim={h['qk_rope_head_dim']}")
    if hf.get("qk_head_dim") not in (None, h["qk_nope_head_dim"] + h["qk_rope_head_dim"]):
        _refuse("qk_head_dim", hf["qk_head_dim"], "HF derives it as qk_nope_head_dim + qk_rope_head_dim")
    kw = {dst: h[src] for src, dst in DIRECT.items()}
    for src, dst in DIRECT.items():
        if kw[dst] is None and src != "bos_token_id":
            if src in MOE_ONLY:  # harmless while no block is MoE; checked again below if one is
                kw[dst] = getattr(ModelConfig, dst)
            else:
                _refuse(src, None, "expected a value")
    kw["q_lora_rank"] = h["q_lora_rank"] or 0
    eos = h["eos_token_id"]
    if isinstance(eos, list):
        if len(eos) > 1:
            _refuse("eos_token_id", eos, "kdarch stops generation on a single eos id")
        eos = eos[0] if eos else None
    kw["eos_token_id"] = eos
    kw.update(_rope_to_kdarch(hf))

    # dense / MoE layout: HF blocks (MTP ones included) with index >= first_k_dense_replace are MoE
    n_layers, n_mtp = h["num_hidden_layers"], _mtp_count(hf)
    fk, n_routed = h["first_k_dense_replace"], h["n_routed_experts"]
    if not isinstance(fk, int) or fk < 0:
        _refuse("first_k_dense_replace", fk, "expected an int >= 0")
    kw["n_mtp_modules"] = n_mtp
    if fk >= n_layers + n_mtp:  # no MoE block at all
        kw.update(n_routed_experts=0, n_dense_layers=n_layers)
    elif fk > n_layers:
        _refuse("first_k_dense_replace", fk, f"it makes MTP layer {n_layers} dense but a later MTP layer MoE")
    elif not isinstance(n_routed, int) or n_routed < 1:
        _refuse("n_routed_experts", n_routed, f"layers >= first_k_dense_replace={fk} are MoE and need experts")
    else:
        kw.update(n_routed_experts=n_routed, n_dense_layers=fk)
        for src in MOE_ONLY:
            if h[src] is None:
                _refuse(src, None, "MoE layers need a value")
        method = hf.get("topk_method", "noaux_tc")
        if method != "noaux_tc" and not (method == "greedy" and h["topk_group"] == h["n_group"]):
            _refuse("topk_method", method, "kdarch routes like 'noaux_tc' (bias for selection, group-limited)")
        if (n_routed // (h["n_group"] or 1)) < 2:
            _refuse("n_group", h["n_group"], "HF scores a group by its top-2 experts: needs >= 2 experts per group")
    alpha = hf.get("aux_loss_alpha", 0.0) or 0.0
    if alpha and hf.get("seq_aux") is False:
        _refuse("seq_aux", False, f"kdarch has only the sequence-wise balance loss (aux_loss_alpha={alpha})")
    kw["seq_aux_loss_coef"] = float(alpha)
    extras = hf.get("kdarch_training") or {}
    if not isinstance(extras, dict) or set(extras) - set(TRAINING_EXTRAS):
        _refuse("kdarch_training", extras, f"expected a dict with keys among {list(TRAINING_EXTRAS)}")
    kw.update(extras)
    try:
        return ModelConfig(**kw)
    except ConfigError as e:
        raise ConfigError(f"Hugging Face DeepseekV3 config maps to an invalid kdarch config: {e}") from None


def kdarch_config_to_hf(cfg: ModelConfig) -> dict:
    """ModelConfig -> a DeepseekV3 config.json dict; refuses what HF DeepseekV3 cannot compute."""
    layers = range(cfg.n_layers + cfg.n_mtp_modules)
    if any(cfg.is_moe_layer(i) for i in layers):
        if cfg.score_func != "sigmoid":
            raise ConfigError(f"kdarch -> Hugging Face: ModelConfig.score_func={cfg.score_func!r} is not supported: "
                              "HF DeepseekV3 always routes with sigmoid scores")
        if cfg.n_routed_experts // cfg.n_group < 2:
            raise ConfigError(f"kdarch -> Hugging Face: ModelConfig.n_group={cfg.n_group} leaves "
                              f"{cfg.n_routed_experts // cfg.n_group} expert per group; HF scores groups by their "
                              "top-2 experts and needs >= 2")
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_factor > 1.0:  # mscale == mscale_all_dim keeps cos/sin unscaled; attention_factor says so outright
        rope = {"rope_type": "yarn", "rope_theta": cfg.rope_theta, "factor": cfg.rope_factor,
                "original_max_position_embeddings": cfg.rope_original_max_seq_len, "beta_fast": cfg.rope_beta_fast,
                "beta_slow": cfg.rope_beta_slow, "mscale": cfg.rope_mscale, "mscale_all_dim": cfg.rope_mscale,
                "attention_factor": 1.0}
    out = {"model_type": HF_MODEL_TYPE, "architectures": [HF_ARCHITECTURE]}
    out.update({src: getattr(cfg, dst) for src, dst in DIRECT.items()})
    out.update(FIXED)
    out.update(
        num_key_value_heads=cfg.n_heads, q_lora_rank=cfg.q_lora_rank or None, eos_token_id=cfg.eos_token_id,
        n_routed_experts=cfg.n_routed_experts,
        first_k_dense_replace=cfg.n_dense_layers if cfg.n_routed_experts else cfg.n_layers + cfg.n_mtp_modules,
        num_nextn_predict_layers=cfg.n_mtp_modules, topk_method="noaux_tc", seq_aux=True,
        aux_loss_alpha=cfg.seq_aux_loss_coef, rope_theta=cfg.rope_theta, rope_parameters=rope,
        rope_scaling=dict(rope) if rope["rope_type"] != "default" else None,
        kdarch_training={k: getattr(cfg, k) for k in TRAINING_EXTRAS})
    return out


# --- state dicts ---------------------------------------------------------------------------------
# A plan item (kdarch key, kind, HF keys): "copy" 1:1, "gate_up" [2I, D] = cat(gate, up), "experts_gate_up"
# [E, 2I, D] = stack(cat(gate_e, up_e)), "experts_down" [E, D, I] = stack(down_e).

def _mlp_plan(k: str, h: str) -> list:
    return [(k + "w_gate_up.weight", "gate_up", [h + "gate_proj.weight", h + "up_proj.weight"]),
            (k + "w_down.weight", "copy", [h + "down_proj.weight"])]


def _block_plan(cfg: ModelConfig, layer_id: int, k: str, h: str) -> list:
    plan = [(k + "attn_norm.weight", "copy", [h + "input_layernorm.weight"]),
            (k + "ffn_norm.weight", "copy", [h + "post_attention_layernorm.weight"])]
    q = ([("wq_a", "q_a_proj"), ("q_norm", "q_a_layernorm"), ("wq_b", "q_b_proj")] if cfg.q_lora_rank
         else [("wq", "q_proj")])
    for mine, theirs in q + [("wkv_a", "kv_a_proj_with_mqa"), ("kv_norm", "kv_a_layernorm"), ("wkv_b", "kv_b_proj"),
                             ("wo", "o_proj")]:
        plan.append((f"{k}attn.{mine}.weight", "copy", [f"{h}self_attn.{theirs}.weight"]))
    k, h = k + "ffn.", h + "mlp."
    if not cfg.is_moe_layer(layer_id):
        return plan + _mlp_plan(k, h)
    experts = range(cfg.n_routed_experts)
    plan += [(k + "gate.weight", "copy", [h + "gate.weight"]),
             (k + "gate.bias", "copy", [h + "gate.e_score_correction_bias"]),
             (k + "w_gate_up", "experts_gate_up",
              [f"{h}experts.{e}.{p}_proj.weight" for e in experts for p in ("gate", "up")]),
             (k + "w_down", "experts_down", [f"{h}experts.{e}.down_proj.weight" for e in experts])]
    return plan + (_mlp_plan(k + "shared.", h + "shared_experts.") if cfg.n_shared_experts else [])


def _plan(cfg: ModelConfig, include_mtp: bool = True) -> list:
    plan = [("embed.weight", "copy", ["model.embed_tokens.weight"]), ("norm.weight", "copy", ["model.norm.weight"])]
    if not cfg.tie_word_embeddings:
        plan.append(("head.weight", "copy", ["lm_head.weight"]))
    for i in range(cfg.n_layers):
        plan += _block_plan(cfg, i, f"layers.{i}.", f"model.layers.{i}.")
    for j in range(cfg.n_mtp_modules if include_mtp else 0):
        k, h = f"mtp.{j}.", f"model.layers.{cfg.n_layers + j}."
        plan += [(k + "enorm.weight", "copy", [h + "enorm.weight"]), (k + "hnorm.weight", "copy", [h + "hnorm.weight"]),
                 (k + "eh_proj.weight", "copy", [h + "eh_proj.weight"]),
                 (k + "norm.weight", "copy", [h + "shared_head.norm.weight"])]
        plan += _block_plan(cfg, cfg.n_layers + j, k + "block.", h)
    return plan


def _fused_key(expert_key: str, kind: str) -> str:
    fused = "gate_up_proj" if kind == "experts_gate_up" else "down_proj"
    return expert_key.split("experts.")[0] + "experts." + fused


def _mtp_copies(cfg: ModelConfig) -> dict[str, str]:
    """HF key of each MTP layer's embedding / head copy -> the main tensor it duplicates."""
    head = "model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"
    out = {}
    for j in range(cfg.n_mtp_modules):
        h = f"model.layers.{cfg.n_layers + j}."
        out[h + "embed_tokens.weight"], out[h + "shared_head.head.weight"] = "model.embed_tokens.weight", head
    return out


def hf_state_dict(model: CausalLM, *, fused_experts: bool = False, include_mtp: bool = True) -> dict[str, torch.Tensor]:
    """The model's weights under HF DeepseekV3 names (views, not copies). Per-expert keys as on disk, or with
    fused_experts the in-memory `mlp.experts.{gate_up_proj,down_proj}`; MTP as DeepSeek's extra layers."""
    cfg, sd = model.config, {k: v.detach() for k, v in model.state_dict().items()}
    out: dict[str, torch.Tensor] = {}
    for kd, kind, hks in _plan(cfg, include_mtp):
        t = sd[kd]
        if kind == "copy":
            out[hks[0]] = t
        elif kind == "gate_up":
            out.update(zip(hks, t.chunk(2, dim=0)))
        elif fused_experts:
            out[_fused_key(hks[0], kind)] = t
        elif kind == "experts_gate_up":
            out.update(zip(hks, [half for e in range(t.shape[0]) for half in t[e].chunk(2, dim=0)]))
        else:
            out.update(zip(hks, t.unbind(0)))
    if include_mtp:
        out.update({k: out[src] for k, src in _mtp_copies(cfg).items()})
    return out


def _unfuse(sd: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """Split HF's in-memory fused expert tensors into the on-disk per-expert keys."""
    out = {k: v for k, v in sd.items() if not k.endswith(("mlp.experts.gate_up_proj", "mlp.experts.down_proj"))}
    for k in sd.keys() - out.keys():
        t, base = sd[k], k.rsplit("gate_up_proj" if k.endswith("gate_up_proj") else "down_proj", 1)[0]
        if t.dim() != 3:
            raise ValueError(f"{source}: fused expert tensor {k} has shape {tuple(t.shape)}, expected 3-D [E, ., .]")
        parts = ({f"{base}{e}.{p}_proj.weight": half for e in range(t.shape[0])
                  for p, half in zip(("gate", "up"), t[e].chunk(2, dim=0))} if k.endswith("gate_up_proj")
                 else {f"{base}{e}.down_proj.weight": t[e] for e in range(t.shape[0])})
        clash = sorted(parts.keys() & out.keys())
        if clash:
            raise ValueError(f"{source}: {k} (fused) and per-expert tensors such as {clash[0]} are both present")
        out.update(parts)
    return out


def hf_to_kdarch_state_dict(cfg: ModelConfig, hf_sd: dict[str, torch.Tensor],
                            source: str = "state dict") -> dict[str, torch.Tensor]:
    """HF-named weights (per-expert or fused experts) -> kdarch names for a model of `cfg`; refuses missing,
    unexpected or mis-shaped tensors by their HF names, and MTP embedding/head copies that differ from the
    main ones."""
    with torch.device("meta"):  # the HF names and shapes of cfg, without allocating a model
        want = hf_state_dict(CausalLM(cfg))
    copies = _mtp_copies(cfg)
    sd = _unfuse(hf_sd, source)
    if cfg.tie_word_embeddings and "lm_head.weight" in sd:  # a tied head saved anyway must be the embedding
        emb = sd.get("model.embed_tokens.weight")
        if emb is not None and not torch.equal(sd["lm_head.weight"], emb):
            raise ValueError(f"{source}: tie_word_embeddings is set but lm_head.weight differs from the embedding")
        sd = {k: v for k, v in sd.items() if k != "lm_head.weight"}
    check_state_dict(sd, want, source, may_miss=set(copies))
    for k, src in copies.items():
        if k in sd and not torch.equal(sd[k], sd[src]):
            raise ValueError(f"{source}: MTP tensor {k} differs from {src}; kdarch shares embedding and head with MTP")
    kd = {}
    for name, kind, hks in _plan(cfg):
        ts = [sd[h] for h in hks]
        if kind == "copy":
            kd[name] = ts[0]
        elif kind == "gate_up":
            kd[name] = torch.cat(ts, dim=0)
        elif kind == "experts_gate_up":
            kd[name] = torch.stack([torch.cat(ts[i:i + 2], dim=0) for i in range(0, len(ts), 2)])
        else:
            kd[name] = torch.stack(ts)
    return kd


# --- directories ----------------------------------------------------------------------------------
def _weight_files(path: Path) -> tuple[list[Path], set[str] | None]:
    index = path / HF_INDEX
    if index.is_file():
        weight_map = read_json(index).get("weight_map", {})
        files = [path / f for f in sorted(set(weight_map.values()))]
        for f in files:
            if not f.is_file():
                raise FileNotFoundError(f"{index} lists {f.name}, which does not exist")
        return files, set(weight_map)
    if (path / HF_WEIGHTS).is_file():
        return [path / HF_WEIGHTS], None
    files = sorted(path.glob("*.safetensors"))
    if files:
        return files, None
    pickles = sorted(p.name for ext in ("*.bin", "*.pt", "*.pth", "*.ckpt") for p in path.glob(ext))
    if pickles:
        raise ValueError(f"{path}: only pickle weights {pickles}, no *.safetensors; kdarch never unpickles weights "
                         "(loading a pickle can run arbitrary code). Convert them to safetensors first.")
    raise FileNotFoundError(f"{path}: no *.safetensors weights found")


def load_hf(path: str | os.PathLike) -> CausalLM:
    """Load a Hugging Face DeepseekV3 directory (config.json + safetensors, sharded or not) as a CausalLM (fp32).
    MTP layers are loaded when the checkpoint has their weights (HF's own saves declare one but store none)."""
    path = Path(path)
    raw = read_json(path / "config.json")
    files, listed = _weight_files(path)
    hf_sd: dict[str, torch.Tensor] = {}
    for f in files:
        for k, v in read_safetensors(f).items():
            if k in hf_sd:
                raise ValueError(f"{path}: tensor {k} appears in more than one safetensors file")
            hf_sd[k] = v
    if listed is not None and listed != hf_sd.keys():
        diff = sorted(listed ^ hf_sd.keys())
        raise ValueError(f"{path / HF_INDEX}: weight_map does not match the files' tensors, e.g. {diff[:4]}")
    n_layers, declared = raw.get("num_hidden_layers", HF_DEFAULTS["num_hidden_layers"]), _mtp_count(raw)
    present = 0
    while present < declared and any(k.startswith(f"model.layers.{n_layers + present}.") for k in hf_sd):
        present += 1
    if present < declared:
        log.info("%s: config declares %d MTP layer(s), weights hold %d; loading %d", path, declared, present, present)
        raw = {**{k: v for k, v in raw.items() if k != "num_mtp_layers"}, "num_nextn_predict_layers": present}
    cfg = hf_config_to_kdarch(raw)
    return model_from_state_dict(cfg, hf_to_kdarch_state_dict(cfg, hf_sd, str(path)), str(path))


def save_hf(model: CausalLM, path: str | os.PathLike) -> Path:
    """Write `model` as a HF DeepseekV3 directory: config.json + model.safetensors (per-expert keys, MTP as
    extra layers), loadable by `transformers.AutoModelForCausalLM.from_pretrained`."""
    path = Path(path)
    config = kdarch_config_to_hf(model.config)  # refuse before writing anything
    config["dtype"] = str(model.embed.weight.dtype).removeprefix("torch.")
    sd = {k: v.to("cpu").contiguous().clone() for k, v in hf_state_dict(model).items()}
    write_safetensors(path / HF_WEIGHTS, sd, metadata={"format": "pt"})
    index = path / HF_INDEX  # a stale shard index would take precedence over the new file
    if index.is_file():
        for shard in set(read_json(index).get("weight_map", {}).values()) - {HF_WEIGHTS}:
            (path / shard).unlink(missing_ok=True)
        index.unlink()
    write_json(path / "config.json", config, indent=2)
    return path


def mtp_layers_note(hf_config: dict) -> str | None:
    """One line saying what transformers makes of a DeepseekV3 checkpoint's MTP layers (None without any):
    it has no MTP module, so it skips them and lists their tensors as UNEXPECTED in its load report."""
    n = _mtp_count(hf_config) if hf_config.get("model_type") == HF_MODEL_TYPE else 0
    if not n:
        return None
    first = hf_config.get("num_hidden_layers", HF_DEFAULTS["num_hidden_layers"])
    where = f"model.layers.{first}" + (f"-{first + n - 1}" if n > 1 else "")
    return (f"the MTP layer{'s' if n > 1 else ''} ({where}, DeepSeek's layout) {'are' if n > 1 else 'is'} kept for "
            f"kdarch and serving engines that draft with {'them' if n > 1 else 'it'} (vLLM, SGLang); transformers "
            f"does not load MTP layers and lists their tensors as UNEXPECTED, which is expected")


def to_hf_model(model: CausalLM, attn_implementation: str = "sdpa"):
    """An in-memory `transformers.DeepseekV3ForCausalLM` with the same weights (copies), dtype and device.
    HF has no MTP modules in its main model, so they are left out."""
    transformers = optional_import("transformers", extra="hf", purpose="to_hf_model (an in-memory transformers model)")
    DeepseekV3Config, DeepseekV3ForCausalLM = transformers.DeepseekV3Config, transformers.DeepseekV3ForCausalLM
    d = {k: v for k, v in kdarch_config_to_hf(model.config).items() if k not in ("model_type", "architectures")}
    hf_cfg = DeepseekV3Config(**d)
    hf_cfg._attn_implementation = attn_implementation
    hf = DeepseekV3ForCausalLM(hf_cfg)
    sd = hf_state_dict(model, fused_experts=True, include_mtp=False)
    if model.config.tie_word_embeddings:
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    missing, unexpected = hf.load_state_dict({k: v.clone() for k, v in sd.items()}, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"to_hf_model: transformers' DeepseekV3 layout changed: missing {missing}, "
                           f"unexpected {unexpected}")
    weight = model.embed.weight
    return hf.to(device=weight.device, dtype=weight.dtype).eval()
