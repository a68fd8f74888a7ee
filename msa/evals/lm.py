"""Held-out language-model evaluations: mean loss on packed windows, and loss per position bucket
(0-1K, 1-2K, 2-4K, ... tokens into a document) on single-document windows."""

from __future__ import annotations

import contextlib
from typing import Dict, List, Optional, Sequence

import torch

from ..data.dataset import Windows, pack_windows
from ..train.loss import forward_loss, lm_loss
from .capture import unwrap


def autocast_ctx(device: torch.device, dtype: Optional[torch.dtype]):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def bucket_edges(seq_len: int, first: int = 1024) -> List[int]:
    """[0, first, 2 first, 4 first, ..., seq_len]: doubling buckets up to the context (one bucket
    [0, seq_len] when seq_len <= first)."""
    edges = [0]
    e = first
    while e < seq_len:
        edges.append(e)
        e *= 2
    edges.append(seq_len)
    return edges


@torch.no_grad()
def eval_loss(model: torch.nn.Module, tokens, windows: Windows, window_ids: Sequence[int], *, device,
              autocast_dtype: Optional[torch.dtype] = None, kl_weight: float = 1.0) -> Dict[str, object]:
    """Mean LM loss and per-layer KL over the given windows (one window per forward, the model in
    its current mode). Returns {"val_lm_loss", "val_kl", "val_layer_kl": {layer: kl}}."""
    model.eval()
    lm_sum, kl_sum, n = 0.0, 0.0, 0
    layer_sums: Dict[int, float] = {}
    for w in window_ids:
        b = pack_windows(tokens, windows, [w], device)
        with autocast_ctx(torch.device(device), autocast_dtype):
            out = forward_loss(model, b.input_ids, b.cu_seqlens, kl_weight=kl_weight)
        lm_sum += float(out["lm_loss"])
        kl_sum += float(out["kl_loss"])
        for i, v in out["layer_kl"].items():
            layer_sums[i] = layer_sums.get(i, 0.0) + float(v)
        n += 1
    model.train()
    n = max(n, 1)
    return {"val_lm_loss": lm_sum / n, "val_kl": kl_sum / n,
            "val_layer_kl": {str(i): v / n for i, v in sorted(layer_sums.items())}}


@torch.no_grad()
def position_bucket_loss(model: torch.nn.Module, tokens, windows: Windows, window_ids: Sequence[int], *,
                         device, edges: Optional[Sequence[int]] = None,
                         autocast_dtype: Optional[torch.dtype] = None) -> Dict[str, object]:
    """Mean next-token loss by the position of the predicting token inside its document, over
    single-document windows (position = offset in the window; windows that pack several documents
    are skipped). edges: bucket boundaries (default bucket_edges(seq_len)).

    Returns {"edges": [...], "buckets": [{"start", "end", "loss", "tokens"}], "windows": count}."""
    model.eval()
    t = windows.seq_len
    edges = list(edges) if edges is not None else bucket_edges(t)
    sums = torch.zeros(len(edges) - 1, dtype=torch.float64)
    counts = torch.zeros(len(edges) - 1, dtype=torch.int64)
    pos = torch.arange(t - 1)
    bucket = torch.bucketize(pos, torch.tensor(edges[1:-1]), right=True)
    used = 0
    for w in window_ids:
        if not windows.single[w]:
            continue
        b = pack_windows(tokens, windows, [w], device)
        with autocast_ctx(torch.device(device), autocast_dtype):
            logits = unwrap(model)(b.input_ids, compute_kl=False).logits
        nll = lm_loss(logits, b.input_ids, None, reduction="none")[0].double().cpu()
        sums.index_add_(0, bucket, nll)
        counts.index_add_(0, bucket, torch.ones_like(bucket))
        used += 1
    model.train()
    out = []
    for i in range(len(edges) - 1):
        c = int(counts[i])
        out.append({"start": edges[i], "end": edges[i + 1], "loss": float(sums[i] / c) if c else None, "tokens": c})
    return {"edges": edges, "buckets": out, "windows": used}
