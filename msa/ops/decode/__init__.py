from .interface import decode_attention, decode_attention_step
from .reference import decode_attention_reference

__all__ = ["decode_attention", "decode_attention_step", "decode_attention_reference"]
