"""Exp-free block top-k (spec section 4): ``block_topk(scores, topk)``."""

from .interface import block_topk
from .reference import block_topk_reference

__all__ = ["block_topk", "block_topk_reference"]
