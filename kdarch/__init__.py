"""kdarch: compact DeepSeek-V3-style student language models (MLA, DeepSeekMoE, MTP), their kernels, and
distillation from any teacher's logits."""
from kdarch.config import PRESETS, ConfigError, ModelConfig, get_preset
from kdarch.model import CausalLM, CausalLMOutput, LatentKVCache, generate
from kdarch.pretrained import from_pretrained, save_pretrained

__version__ = "0.1.0"
__all__ = ["PRESETS", "CausalLM", "CausalLMOutput", "ConfigError", "LatentKVCache", "ModelConfig", "from_pretrained",
           "generate", "get_preset", "save_pretrained"]
