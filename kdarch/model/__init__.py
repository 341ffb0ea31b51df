"""kdarch.model: the student architecture (MLA attention, DeepSeekMoE, MTP) and its latent-KV generation."""
from kdarch.model.cache import LatentKVCache, StaticLatentKVCache
from kdarch.model.generation import decode_step, generate, sample_next
from kdarch.model.speculative import SpeculativeStats, generate_speculative
from kdarch.model.transformer import Block, CausalLM, CausalLMOutput, MTPModule

__all__ = ["Block", "CausalLM", "CausalLMOutput", "LatentKVCache", "MTPModule", "SpeculativeStats",
           "StaticLatentKVCache", "decode_step", "generate", "generate_speculative", "sample_next"]
