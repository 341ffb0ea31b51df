import json

import pytest
import torch

import kdarch
from kdarch import CausalLM, get_preset, save_pretrained


@pytest.mark.parametrize("changes", [{}, {"tie_word_embeddings": True, "q_lora_rank": 0}])
def test_kdarch_round_trip(tmp_path, changes):
    torch.manual_seed(0)
    model = CausalLM(get_preset("debug", **changes)).eval()
    for m in model.moe_layers():
        m.gate.bias.normal_()
    save_pretrained(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    loaded = kdarch.from_pretrained(tmp_path).eval()
    assert loaded.config == model.config
    x = torch.randint(0, 256, (2, 10))
    a, b = model(x, output_mtp_logits=True), loaded(x, output_mtp_logits=True)
    torch.testing.assert_close(a.logits, b.logits, rtol=0, atol=0)
    torch.testing.assert_close(a.mtp_logits[0], b.mtp_logits[0], rtol=0, atol=0)
    if model.config.tie_word_embeddings:
        assert loaded.head.weight is loaded.embed.weight


def test_refuses_bad_directories(tmp_path):
    with pytest.raises(FileNotFoundError, match="with config.json"):
        kdarch.from_pretrained(tmp_path)
    model = CausalLM(get_preset("debug"))
    save_pretrained(model, tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        kdarch.from_pretrained(tmp_path)
    save_pretrained(model, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["n_layers"] = 3
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="missing .*layers.2"):
        kdarch.from_pretrained(tmp_path)
    cfg["n_layers"], cfg["hidden_size"] = 2, 32
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"expected shape .* got"):
        kdarch.from_pretrained(tmp_path)
    cfg["model_type"] = "llama"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="model_type: expected 'kdarch' or 'deepseek_v3', got 'llama'"):
        kdarch.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="format: expected one of 'kdarch', 'hf', got 'gguf'"):
        save_pretrained(model, tmp_path, format="gguf")
