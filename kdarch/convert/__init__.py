"""kdarch.convert: moving models between kdarch and other formats (Hugging Face DeepseekV3 checkpoints)."""
from kdarch.convert.hf import (
                               hf_config_to_kdarch,
                               hf_state_dict,
                               hf_to_kdarch_state_dict,
                               kdarch_config_to_hf,
                               load_hf,
                               save_hf,
                               to_hf_model,
)

__all__ = ["hf_config_to_kdarch", "hf_state_dict", "hf_to_kdarch_state_dict", "kdarch_config_to_hf", "load_hf",
           "save_hf", "to_hf_model"]
