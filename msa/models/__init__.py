from .msa_lm import LMOutput, MSAForCausalLM, MSALMConfig

__all__ = ["MSAForCausalLM", "MSALMConfig", "LMOutput"]
