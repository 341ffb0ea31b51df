"""kdarch <-> Hugging Face DeepseekV3: configs, weights and logits agree both ways; what cannot convert is refused."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import AutoModelForCausalLM, DeepseekV3Config, DeepseekV3ForCausalLM  # noqa: E402

import kdarch  # noqa: E402
from kdarch import ConfigError, get_preset  # noqa: E402
from kdarch.convert.hf import hf_config_to_kdarch, kdarch_config_to_hf, to_hf_model  # noqa: E402

ATOL = RTOL = 1e-5
BASE_HF = dict(vocab_size=128, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
               num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1, n_routed_experts=8, n_group=4,
               topk_group=2, num_experts_per_tok=3, first_k_dense_replace=1, q_lora_rank=32, kv_lora_rank=24,
               qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=12, max_position_embeddings=64,
               routed_scaling_factor=2.0)
YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 16,
        "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707}


@torch.no_grad()
def _randomize(model, seed: int):
    """Weights with std 0.08, norms near 1, nonzero balancing biases: logits that actually depend on every tensor."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=g)
        p.copy_(1 + 0.1 * noise if "norm" in name else 0.08 * noise)
    for name, b in model.named_buffers():
        if name.endswith(("e_score_correction_bias", "gate.bias")):
            b.copy_(0.2 * torch.randn(b.shape, generator=g))
    return model


def _hf_model(attn="eager", seed=0, **overrides):
    cfg = DeepseekV3Config(**{**BASE_HF, **overrides})
    cfg._attn_implementation = attn
    return _randomize(DeepseekV3ForCausalLM(cfg), seed).eval()


def _ids(vocab=128, T=24, seed=1):
    return torch.randint(0, vocab, (2, T), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _assert_same_logits(hf, km, ids):
    a, b = hf(ids).logits, km.eval()(ids).logits
    assert a.abs().max() > 0.5  # the comparison means something
    torch.testing.assert_close(b, a, atol=ATOL, rtol=RTOL)


# --- HF -> kdarch ---------------------------------------------------------------------------------
HF_CASES = {
    "qlora_groups_dense1": dict(),
    "no_qlora_all_moe": dict(q_lora_rank=None, first_k_dense_replace=0, n_group=2, topk_group=1, n_shared_experts=2),
    "yarn_sdpa": dict(rope_parameters=dict(YARN), attn="sdpa"),
    "tied_no_norm_topk": dict(tie_word_embeddings=True, norm_topk_prob=False, first_k_dense_replace=2, n_group=1,
                              topk_group=1),
    "eps_1e-5": dict(rms_norm_eps=1e-5),  # the q/kv latent norms keep eps 1e-6 in both
}


@pytest.mark.parametrize("case", HF_CASES)
def test_hf_checkpoint_loads_with_same_logits(tmp_path, case):
    kw = dict(HF_CASES[case])
    hf = _hf_model(attn=kw.pop("attn", "eager"), **kw)
    hf.save_pretrained(tmp_path)
    km = kdarch.from_pretrained(tmp_path)
    cfg = km.config
    assert (cfg.q_lora_rank, cfg.n_dense_layers, cfg.n_mtp_modules) == (kw.get("q_lora_rank", 32) or 0,
                                                                        kw.get("first_k_dense_replace", 1), 0)
    if "rope_parameters" in kw:
        assert (cfg.rope_factor, cfg.rope_original_max_seq_len, cfg.rope_mscale) == (4.0, 16, 0.707)
    bias = km.layers[-1].ffn.gate.bias
    assert bias.abs().min() > 0 and torch.equal(bias, hf.model.layers[-1].mlp.gate.e_score_correction_bias)
    _assert_same_logits(hf, km, _ids(T=48 if "rope_parameters" in kw else 24))


def test_fused_in_memory_expert_keys_load(tmp_path):
    hf = _hf_model()
    hf.save_pretrained(tmp_path)
    sd = {k: v.contiguous() for k, v in hf.state_dict().items()}  # transformers' in-memory names
    assert any(k.endswith("mlp.experts.gate_up_proj") for k in sd)
    (tmp_path / "model.safetensors").unlink()
    save_file(sd, tmp_path / "model.safetensors", metadata={"format": "pt"})
    _assert_same_logits(hf, kdarch.from_pretrained(tmp_path), _ids())


def test_sharded_checkpoint_with_index_and_old_rope_scaling_key(tmp_path):
    hf = _hf_model(rope_parameters=dict(YARN))
    hf.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    raw = json.loads((tmp_path / "config.json").read_text())
    rope = raw.pop("rope_parameters")  # the pre-5.x layout: rope_theta at top level, rope_scaling with "type"
    raw["rope_theta"] = rope.pop("rope_theta")
    raw["rope_scaling"] = {("type" if k == "rope_type" else k): v for k, v in rope.items()}
    (tmp_path / "config.json").write_text(json.dumps(raw))
    km = kdarch.from_pretrained(tmp_path)
    assert km.config.rope_factor == 4.0
    _assert_same_logits(AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager"), km, _ids(T=40))


# --- kdarch -> HF ---------------------------------------------------------------------------------
KD_CASES = {
    "debug_preset_mtp": dict(),
    "plain_q_tied_yarn_mscale0": dict(q_lora_rank=0, tie_word_embeddings=True, rope_factor=4.0,
                                      rope_original_max_seq_len=32, rope_mscale=0.0, n_dense_layers=0, n_group=1,
                                      topk_group=1, norm_topk_prob=False),
    "dense_only": dict(n_routed_experts=0, n_mtp_modules=1),
}


def _kd_model(seed=0, **overrides):
    return _randomize(kdarch.CausalLM(get_preset("debug", **overrides)), seed).eval()


@pytest.mark.parametrize("case", KD_CASES)
def test_kdarch_saves_hf_dir_transformers_loads_same_logits(tmp_path, case):
    km = _kd_model(**KD_CASES[case])
    kdarch.save_pretrained(km, tmp_path, format="hf")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(hf).__name__ == "DeepseekV3ForCausalLM"
    _assert_same_logits(hf, km, _ids(vocab=256, T=60))
    back = kdarch.from_pretrained(tmp_path)  # and back: identical tensors, identical config
    cfg = km.config  # without routed experts, n_dense_layers is inert and comes back as n_layers
    assert back.config == (cfg if cfg.n_routed_experts else cfg.replace(n_dense_layers=cfg.n_layers))
    sd, sd_back = km.state_dict(), back.state_dict()
    assert sd.keys() == sd_back.keys() and all(torch.equal(sd[k], sd_back[k]) for k in sd)


def test_to_hf_model_in_memory(tmp_path):
    km = _kd_model(seed=3)
    _assert_same_logits(to_hf_model(km, attn_implementation="eager"), km, _ids(vocab=256))


def test_mtp_layer_round_trip(tmp_path):
    km = _kd_model(seed=5)
    kdarch.save_pretrained(km, tmp_path, format="hf")
    n = km.config.n_layers
    disk = load_file(tmp_path / "model.safetensors")
    for key in ("enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight", "shared_head.head.weight",
                "embed_tokens.weight", "self_attn.kv_b_proj.weight", "mlp.experts.0.gate_proj.weight"):
        assert f"model.layers.{n}.{key}" in disk
    assert torch.equal(disk[f"model.layers.{n}.shared_head.head.weight"], km.head.weight)
    assert json.loads((tmp_path / "config.json").read_text())["num_nextn_predict_layers"] == 1
    back = kdarch.from_pretrained(tmp_path).eval()
    assert back.config.n_mtp_modules == 1
    ids = _ids(vocab=256)
    with torch.no_grad():
        a, b = km(ids, output_mtp_logits=True), back(ids, output_mtp_logits=True)
    torch.testing.assert_close(b.mtp_logits[0], a.mtp_logits[0], atol=0, rtol=0)


# --- configs --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["debug", "tiny", "bench", "small"])
def test_config_round_trip_and_transformers_accepts_it(name):
    cfg = get_preset(name, seq_aux_loss_coef=1e-4, eos_token_id=3)
    d = kdarch_config_to_hf(cfg)
    assert hf_config_to_kdarch(json.loads(json.dumps(d))) == cfg
    hf = DeepseekV3Config(**{k: v for k, v in d.items() if k not in ("model_type", "architectures")})
    assert (hf.num_key_value_heads, hf.q_lora_rank, hf.num_nextn_predict_layers) == (
        cfg.n_heads, cfg.q_lora_rank, cfg.n_mtp_modules)


def test_deepseek_v3_hub_config_maps():
    """The published DeepSeek-V3 config.json (quantization_config removed): YaRN factor 40, mscale 1."""
    hub = {"architectures": ["DeepseekV3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
           "auto_map": {}, "aux_loss_alpha": 0.001, "bos_token_id": 0, "eos_token_id": 1, "ep_size": 1,
           "first_k_dense_replace": 3, "hidden_act": "silu", "hidden_size": 7168, "initializer_range": 0.02,
           "intermediate_size": 18432, "kv_lora_rank": 512, "max_position_embeddings": 163840,
           "model_type": "deepseek_v3", "moe_intermediate_size": 2048, "moe_layer_freq": 1, "n_group": 8,
           "n_routed_experts": 256, "n_shared_experts": 1, "norm_topk_prob": True, "num_attention_heads": 128,
           "num_experts_per_tok": 8, "num_hidden_layers": 61, "num_key_value_heads": 128,
           "num_nextn_predict_layers": 1, "q_lora_rank": 1536, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
           "rms_norm_eps": 1e-06, "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0,
                                                   "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096,
                                                   "type": "yarn"},
           "rope_theta": 10000, "routed_scaling_factor": 2.5, "scoring_func": "sigmoid", "seq_aux": True,
           "tie_word_embeddings": False, "topk_group": 4, "topk_method": "noaux_tc", "torch_dtype": "bfloat16",
           "transformers_version": "4.33.1", "use_cache": True, "v_head_dim": 128, "vocab_size": 129280}
    cfg = hf_config_to_kdarch(hub)
    assert (cfg.n_layers, cfg.n_dense_layers, cfg.n_routed_experts, cfg.n_mtp_modules) == (61, 3, 256, 1)
    assert (cfg.rope_factor, cfg.rope_original_max_seq_len, cfg.rope_mscale) == (40, 4096, 1.0)
    assert cfg.seq_aux_loss_coef == 0.001
    assert cfg.softmax_scale == pytest.approx(192 ** -0.5 * (0.1 * torch.tensor(40.0).log().item() + 1) ** 2)
    with pytest.raises(ConfigError, match="quantization_config"):
        hf_config_to_kdarch({**hub, "quantization_config": {"quant_method": "fp8"}})


# --- refusals -------------------------------------------------------------------------------------
@pytest.mark.parametrize("field, value, match", [
    ("hidden_act", "gelu", "hidden_act='gelu'"),
    ("attention_bias", True, "attention_bias=True"),
    ("num_key_value_heads", 2, "num_key_value_heads=2"),
    ("rope_interleave", False, "rope_interleave=False"),
    ("scoring_func", "softmax", "scoring_func='softmax'"),
    ("topk_method", "group_limited_greedy", "topk_method"),
    ("rope_parameters", {"rope_type": "llama3", "factor": 8.0}, "rope_type='llama3'"),
    ("rope_parameters", {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
     "attention_factor"),
    ("n_routed_experts", None, "n_routed_experts=None"),
    ("eos_token_id", [1, 2], "eos_token_id"),
    ("some_new_field", 1, r"unknown key\(s\) \['some_new_field'\]"),
])
def test_unsupported_hf_fields_are_refused(field, value, match):
    hf = {**BASE_HF, "model_type": "deepseek_v3", field: value}
    with pytest.raises(ConfigError, match=match):
        hf_config_to_kdarch(hf)


def test_softmax_router_export_refused(tmp_path):
    km = kdarch.CausalLM(get_preset("debug", score_func="softmax"))
    with pytest.raises(ConfigError, match="score_func='softmax'"):
        kdarch.save_pretrained(km, tmp_path, format="hf")
    assert not any(tmp_path.iterdir())  # nothing written


def test_hf_dir_with_unsupported_field_refused(tmp_path):
    _hf_model(hidden_act="gelu").save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="hidden_act='gelu'"):
        kdarch.from_pretrained(tmp_path)


@pytest.fixture
def hf_dir(tmp_path):
    _hf_model(seed=7).save_pretrained(tmp_path / "m")
    return tmp_path / "m"


def test_bin_only_directory_refused(hf_dir):
    (hf_dir / "model.safetensors").rename(hf_dir / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"only pickle weights \['pytorch_model.bin'\].*never unpickles"):
        kdarch.from_pretrained(hf_dir)


def test_missing_and_unexpected_tensors_refused(hf_dir):
    sd = load_file(hf_dir / "model.safetensors")
    missing = {k: v for k, v in sd.items() if k != "model.layers.2.mlp.experts.5.up_proj.weight"}
    save_file(missing, hf_dir / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing \['model.layers.2.mlp.experts.5.up_proj.weight'\]"):
        kdarch.from_pretrained(hf_dir)
    save_file({**sd, "model.layers.0.mlp.gate.weight": sd["model.norm.weight"].clone()}, hf_dir / "model.safetensors",
              metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"unexpected \['model.layers.0.mlp.gate.weight'\]"):
        kdarch.from_pretrained(hf_dir)
    save_file({**sd, "model.norm.weight": sd["model.norm.weight"][:-1].clone()}, hf_dir / "model.safetensors",
              metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"model.norm.weight: expected shape \(64,\), got \(63,\)"):
        kdarch.from_pretrained(hf_dir)


def test_corrupt_safetensors_refused(hf_dir):
    data = (hf_dir / "model.safetensors").read_bytes()
    (hf_dir / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        kdarch.from_pretrained(hf_dir)


def test_save_hf_replaces_a_stale_sharded_checkpoint(hf_dir):
    _hf_model(seed=8).save_pretrained(hf_dir, max_shard_size="100KB")
    km = _kd_model(seed=9)
    kdarch.save_pretrained(km, hf_dir, format="hf")
    assert not (hf_dir / "model.safetensors.index.json").exists()
    assert sorted(p.name for p in hf_dir.glob("*.safetensors")) == ["model.safetensors"]
    _assert_same_logits(AutoModelForCausalLM.from_pretrained(hf_dir), km, _ids(vocab=256))
    shutil.rmtree(hf_dir)


def test_the_mtp_layer_is_explained_once_not_listed(tmp_path, caplog, capfd):
    """transformers skips DeepSeek's MTP layer and prints a table of its tensors as UNEXPECTED; a kdarch HF teacher
    says once what that layer is instead."""
    from kdarch.convert.hf import mtp_layers_note
    from kdarch.distill import HFTeacher
    torch.manual_seed(0)
    km = kdarch.CausalLM(kdarch.get_preset("debug"))
    kdarch.save_pretrained(km, tmp_path, format="hf")
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert "model.layers.2" in mtp_layers_note(cfg) and mtp_layers_note({**cfg, "num_nextn_predict_layers": 0}) is None
    capfd.readouterr()
    with caplog.at_level("WARNING"):
        HFTeacher(tmp_path, dtype=torch.float32)
    err = capfd.readouterr().err
    assert "UNEXPECTED" not in err
    notes = [r.getMessage() for r in caplog.records if "MTP layer" in r.getMessage()]
    assert len(notes) == 1 and "transformers does not load MTP layers" in notes[0]
