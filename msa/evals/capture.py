"""Forward hooks that capture what each MSA layer saw and produced (its input, cu_seqlens, the KL it
computed and the blocks it selected), without changing the model."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, List, Optional

import torch
from torch import nn


def unwrap(model: nn.Module) -> nn.Module:
    """The MSAForCausalLM inside a DDP / compile wrapper (``.module`` / ``._orig_mod``)."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if inner is None:
            return model
        model = inner


def msa_layer_ids(model: nn.Module) -> List[int]:
    """Indices of the decoder layers that have an index branch."""
    return [i for i, lyr in enumerate(unwrap(model).layers) if lyr.attn.config.use_index]


@dataclass
class Captured:
    """layer: decoder layer index; x: the attention input (B, T, hidden) (still in the autograd
    graph); cu_seqlens: int32 (S+1,) or None; kl: fp32 scalar or None; block_indices: int32
    (B, T, H_kv, topk) or None (dense mode)."""

    layer: int
    attn: nn.Module
    x: torch.Tensor
    cu_seqlens: Optional[torch.Tensor]
    kl: Optional[torch.Tensor]
    block_indices: Optional[torch.Tensor]


@contextlib.contextmanager
def capture_msa_layers(model: nn.Module, keep_input: bool = True) -> Iterator[List[Captured]]:
    """Within the block, every forward of an MSA layer appends a Captured record to the yielded list."""
    records: List[Captured] = []
    handles = []
    for i, lyr in enumerate(unwrap(model).layers):
        if not lyr.attn.config.use_index:
            continue

        def hook(mod, args, kwargs, out, _i=i):
            x = args[0] if args else kwargs["x"]
            records.append(Captured(_i, mod, x if keep_input else None, kwargs.get("cu_seqlens"), out.kl_loss,
                                    out.block_indices))
        handles.append(lyr.attn.register_forward_hook(hook, with_kwargs=True))
    try:
        yield records
    finally:
        for h in handles:
            h.remove()
