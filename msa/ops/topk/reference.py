"""Pure-PyTorch reference of the exp-free block top-k (``msa.ops.topk.block_topk``)."""

from __future__ import annotations

import torch


@torch.no_grad()
def block_topk_reference(scores: torch.Tensor, topk: int) -> torch.Tensor:
    """Indices of the ``topk`` largest entries of every row, -1 where a row runs out of finite entries.

    scores: fp32 (R, N). Entries equal to -inf (and NaN) are never selected.
    Returns int32 (R, topk), by descending score (ties by ascending column), -1 padding at the end.
    """
    r, n = scores.shape
    x = scores.float()
    x = torch.where(torch.isnan(x), torch.full_like(x, float("-inf")), x)
    kk = min(topk, n)
    # Stable order: sort by (value desc, column asc); a stable sort on the value alone does that.
    vals, ids = torch.sort(x, dim=-1, descending=True, stable=True)
    vals, ids = vals[:, :kk], ids[:, :kk]
    out = torch.where(vals > float("-inf"), ids, torch.full_like(ids, -1)).to(torch.int32)
    if kk < topk:
        out = torch.cat([out, out.new_full((r, topk - kk), -1)], dim=-1)
    return out
