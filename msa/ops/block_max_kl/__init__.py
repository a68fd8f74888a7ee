from .interface import block_max_kl_loss

__all__ = ["block_max_kl_loss"]
