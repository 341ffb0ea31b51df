import dataclasses
import json

import pytest
import torch

from kdarch import PRESETS, CausalLM, ConfigError, ModelConfig, get_preset

VARIANTS = {
    "debug": {},
    "plain_q": {"q_lora_rank": 0},
    "tied": {"tie_word_embeddings": True},
    "dense_only": {"n_routed_experts": 0},
    "no_mtp": {"n_mtp_modules": 0},
    "two_mtp_no_shared": {"n_mtp_modules": 2, "n_shared_experts": 0},
    "all_dense_layers": {"n_dense_layers": 2},
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_param_count_matches_model(variant):
    cfg = get_preset("debug", **VARIANTS[variant])
    model = CausalLM(cfg)
    assert cfg.num_params() == model.num_params()
    assert cfg.num_params(include_mtp=False) == model.num_params() - sum(p.numel() for p in model.mtp.parameters())


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_build_on_meta_and_count(name):
    cfg = get_preset(name)
    with torch.device("meta"):
        model = CausalLM(cfg)
    assert cfg.num_params() == model.num_params()


def test_active_params_formula():
    cfg = get_preset("debug")
    expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size
    n_moe = cfg.n_layers - cfg.n_dense_layers
    idle = n_moe * (cfg.n_routed_experts - cfg.num_experts_per_tok) * expert
    mtp = sum(p.numel() for p in CausalLM(cfg).mtp.parameters())
    assert cfg.num_active_params() == cfg.num_params() - mtp - idle


def test_small_preset_is_a_real_student():
    cfg = get_preset("small")
    assert 0.4e9 <= cfg.num_params() <= 0.6e9
    assert 80e6 <= cfg.num_active_params() <= 120e6


def test_kv_cache_bytes():
    cfg = get_preset("debug")
    assert cfg.kv_cache_bytes_per_token(latent=True, dtype_bytes=2) == cfg.n_layers * (32 + 8) * 2
    assert cfg.kv_cache_bytes_per_token(latent=False, dtype_bytes=4) == cfg.n_layers * 4 * (24 + 16) * 4


def test_json_round_trip(tmp_path):
    cfg = get_preset("tiny", rope_factor=4.0, score_func="softmax")
    assert ModelConfig.from_json(cfg.to_json()) == cfg
    cfg.to_json(tmp_path / "c.json")
    assert ModelConfig.from_json(tmp_path / "c.json") == cfg
    assert json.loads(cfg.to_json())["rope_factor"] == 4.0


@pytest.mark.parametrize("changes, field", [
    ({"num_experts_per_tok": 9}, "num_experts_per_tok"),
    ({"n_group": 3}, "n_group"),
    ({"topk_group": 3}, "topk_group"),
    ({"hidden_size": 0}, "hidden_size"),
    ({"kv_lora_rank": -4}, "kv_lora_rank"),
    ({"q_lora_rank": -1}, "q_lora_rank"),
    ({"qk_rope_head_dim": 7}, "qk_rope_head_dim"),
    ({"score_func": "relu"}, "score_func"),
    ({"n_dense_layers": 3}, "n_dense_layers"),
    ({"rope_factor": 0.5}, "rope_factor"),
    ({"eos_token_id": 256}, "eos_token_id"),
    ({"vocab_size": 10.5}, "vocab_size"),
])
def test_bad_config_names_the_field(changes, field):
    with pytest.raises(ConfigError, match=rf"ModelConfig\.{field}: expected"):
        get_preset("debug", **changes)


def test_group_routing_needs_enough_experts():
    # 4 groups of 2 experts, 1 group allowed -> only 2 candidates for top-3
    with pytest.raises(ConfigError, match="topk_group"):
        get_preset("debug", n_group=4, topk_group=1, num_experts_per_tok=3)


def test_unknown_field_and_preset():
    with pytest.raises(ConfigError, match="unknown field"):
        ModelConfig.from_dict({"hidden_sise": 8})
    with pytest.raises(ConfigError, match="available presets"):
        get_preset("huge")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelConfig.from_json("{oops")


def test_config_is_frozen():
    cfg = get_preset("debug")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.hidden_size = 3  # type: ignore[misc]
