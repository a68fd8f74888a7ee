from .interface import decode_attention
from .reference import decode_attention_reference

__all__ = ["decode_attention", "decode_attention_reference"]
