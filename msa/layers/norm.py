"""RMSNorm, optionally with the (1 + w) gain parameterisation MiniMax-M3 uses on the index branch."""

from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6, unit_offset: bool = False):
        super().__init__()
        self.eps, self.unit_offset = eps, unit_offset
        # with unit_offset the stored weight is w and the gain is (1 + w), so zeros mean identity
        self.weight = nn.Parameter(torch.zeros(dim) if unit_offset else torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        gain = (1.0 + self.weight.float()) if self.unit_offset else self.weight.float()
        return (y * gain).to(x.dtype)
