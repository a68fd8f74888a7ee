from .attention import MSAAttention, MSAConfig, MSAOutput

__all__ = ["MSAAttention", "MSAConfig", "MSAOutput"]
