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

# msa.metrics.indexer_recall's per-query means, averaged per layer then over layers
METRICS = ("block_recall", "score_recall", "selected_mass", "teacher_entropy", "top_half_recall", "oracle_mass",
           "max_rule_recall")


@torch.no_grad()
def recall_eval(model: torch.nn.Module, tokens, windows: Windows, window_ids: Sequence[int], *, device,
                autocast_dtype: Optional[torch.dtype] = None) -> Dict[str, object]:
    """For every MSA layer: the selection of its index branch (select_blocks with the layer's
    block_size / topk_blocks / init_blocks / local_blocks, whatever mode the model is in) scored
    against the top-k blocks of its main branch's causal attention mass.

    Returns {"block_recall", "score_recall", "selected_mass", "teacher_entropy", "top_half_recall",
    "oracle_mass", "max_rule_recall" (means over layers; msa.metrics.indexer_recall), "layer_block_recall",
    "layer_score_recall": {layer: value}} or {} when the model has no MSA layer."""
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
            res = indexer_recall(q, k, sel, block_size=c.block_size, cu_seqlens=b.cu_seqlens,
                                 init_blocks=c.init_blocks, local_blocks=c.local_blocks)
            if res["queries"] == 0:
                continue
            acc = per.setdefault(r.layer, dict.fromkeys(METRICS + ("n",), 0.0))
            for key in METRICS:
                acc[key] += res[key] * res["queries"]
            acc["n"] += res["queries"]
    m.train()
    if not per:
        return {}
    out = {key: sum(v[key] / v["n"] for v in per.values()) / len(per) for key in METRICS}
    out["layer_block_recall"] = {str(i): v["block_recall"] / v["n"] for i, v in sorted(per.items())}
    out["layer_score_recall"] = {str(i): v["score_recall"] / v["n"] for i, v in sorted(per.items())}
    return out
