from .interface import select_blocks

__all__ = ["select_blocks"]
