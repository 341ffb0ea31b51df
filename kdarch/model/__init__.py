"""kdarch.model: the student architecture (MLA attention, DeepSeekMoE, MTP) and its latent-KV generation."""
from kdarch.model.cache import LatentKVCache
from kdarch.model.generate import generate, sample_next
from kdarch.model.transformer import Block, CausalLM, CausalLMOutput, MTPModule, causal_lm_loss

__all__ = ["Block", "CausalLM", "CausalLMOutput", "LatentKVCache", "MTPModule", "causal_lm_loss", "generate",
           "sample_next"]
