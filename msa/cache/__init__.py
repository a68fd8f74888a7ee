"""KV + index-key cache for MSA decoding: ``storage`` (contiguous or paged K/V/index-key storage,
``MSACache``), ``fp8`` (index-key quantisation codec) and ``pages`` (page allocator)."""

from .fp8 import FP8_MAX, INDEX_SCALE_MODES, dequantize_fp8, quantize_fp8, quantize_fp8_key_blocks
from .pages import PageAllocator
from .storage import MSACache

__all__ = ["MSACache", "PageAllocator", "quantize_fp8", "dequantize_fp8", "FP8_MAX", "INDEX_SCALE_MODES"]
