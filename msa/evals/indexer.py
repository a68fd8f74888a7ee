"""Indexer quality through training: per-layer block recall and score recall (msa.metrics, the
paper's section 5.2) of the blocks the sparse phase would select, against the main branch's own
full attention."""

from __future__ import annotations

from typing import Dict, Optional, Sequence

import torch

from ..data.dataset import Windows, pack_windows
from ..metrics import indexer_recall
from ..ops.common import positions_in_sequence
from ..ops.select_blocks import select_blocks
from .capture import capture_msa_layers, unwrap
from .lm import autocast_ctx


@torch.no_grad()
def recall_eval(model: torch.nn.Module, tokens, windows: Windows, window_ids: Sequence[int], *, device,
                autocast_dtype: Optional[torch.dtype] = None) -> Dict[str, object]:
    """For every MSA layer: the selection of its index branch (select_blocks with the layer's
    block_size / topk_blocks / init_blocks / local_blocks, whatever mode the model is in) scored
    against the top-k blocks of its main branch's causal attention mass.

    Returns {"block_recall", "score_recall", "selected_mass", "teacher_entropy" (means over layers;
    msa.metrics.indexer_recall), "layer_block_recall", "layer_score_recall": {layer: value}} or {}
    when the model has no MSA layer."""
    m = unwrap(model)
    m.eval()
    per: Dict[int, Dict[str, float]] = {}
    for w in window_ids:
        b = pack_windows(tokens, windows, [w], device)
        with capture_msa_layers(m) as recs, autocast_ctx(torch.device(device), autocast_dtype):
            m(b.input_ids, cu_seqlens=b.cu_seqlens, compute_kl=False)
        t = b.input_ids.shape[1]
        pos = positions_in_sequence(t, b.cu_seqlens, b.input_ids.device).view(1, t)
        for r in recs:
            c = r.attn.config
            with autocast_ctx(torch.device(device), autocast_dtype):
                q, k, _, q_idx, k_idx = r.attn.project(r.x, pos)
                sel = select_blocks(q_idx, k_idx, block_size=c.block_size, topk=c.topk_blocks,
                                    init_blocks=c.init_blocks, local_blocks=c.local_blocks, cu_seqlens=b.cu_seqlens,
                                    backend=c.backend)
            res = indexer_recall(q, k, sel, block_size=c.block_size, cu_seqlens=b.cu_seqlens)
            if res["queries"] == 0:
                continue
            acc = per.setdefault(r.layer, {"br": 0.0, "sr": 0.0, "sm": 0.0, "ent": 0.0, "n": 0})
            acc["br"] += res["block_recall"] * res["queries"]
            acc["sr"] += res["score_recall"] * res["queries"]
            acc["sm"] += res["selected_mass"] * res["queries"]
            acc["ent"] += res["teacher_entropy"] * res["queries"]
            acc["n"] += res["queries"]
    m.train()
    if not per:
        return {}
    lbr = {str(i): v["br"] / v["n"] for i, v in sorted(per.items())}
    lsr = {str(i): v["sr"] / v["n"] for i, v in sorted(per.items())}
    mean = lambda key: sum(v[key] / v["n"] for v in per.values()) / len(per)  # noqa: E731
    return {"block_recall": sum(lbr.values()) / len(lbr), "score_recall": sum(lsr.values()) / len(lsr),
            "selected_mass": mean("sm"), "teacher_entropy": mean("ent"),
            "layer_block_recall": lbr, "layer_score_recall": lsr}
