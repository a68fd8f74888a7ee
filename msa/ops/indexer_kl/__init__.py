from .interface import indexer_kl_loss

__all__ = ["indexer_kl_loss"]
