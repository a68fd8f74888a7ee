"""msa: MiniMax Sparse Attention in PyTorch + Triton (reference, kernels, layer, model, training)."""

from . import flops, tuning
from .cache import MSACache
from .layers import MSAAttention, MSAConfig
from .models import LMOutput, MSAForCausalLM, MSALMConfig
from .ops import block_max_kl_loss, block_topk, decode_attention, indexer_kl_loss, select_blocks, sparse_attention

__version__ = "0.1.0"

__all__ = ["select_blocks", "sparse_attention", "indexer_kl_loss", "block_max_kl_loss", "decode_attention", "block_topk", "MSAConfig", "MSAAttention", "MSACache",
           "MSAForCausalLM", "MSALMConfig", "LMOutput",
           "flops", "tuning", "__version__"]
