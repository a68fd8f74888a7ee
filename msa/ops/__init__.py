from .decode import decode_attention
from .block_max_kl import block_max_kl_loss
from .indexer_kl import indexer_kl_loss
from .select_blocks import select_blocks
from .sparse_attention import sparse_attention
from .topk import block_topk

__all__ = ["select_blocks", "sparse_attention", "indexer_kl_loss", "block_max_kl_loss", "decode_attention", "block_topk"]
