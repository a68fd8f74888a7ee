"""Checkpoints through torch.distributed.checkpoint (DCP) that resume on any number of ranks.

The model and optimizer states are taken with ``torch.distributed.checkpoint.state_dict`` (fully
qualified names without the DDP ``module.`` prefix; FSDP2 parameters and optimizer states as sharded
DTensors), so a checkpoint written by R ranks under DDP or FSDP2 loads into FSDP2 on R' ranks, DDP, or
a plain model in one process (DCP reshards on load). Small training metadata (step, data position,
anything JSON-serialisable) is written by rank 0 as ``train_state.json`` in the same directory.
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from ..ops.common import check

TRAIN_STATE = "train_state.json"


def _dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def save_checkpoint(path: str, model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None, *,
                    train_state: Optional[Dict[str, Any]] = None) -> None:
    """Write a checkpoint directory (call on every rank, same path on a shared filesystem).

    Args:
        path: directory (created).
        model: plain, DDP or FSDP2 module. optimizer: its optimizer, or None.
        train_state: JSON-serialisable metadata (e.g. {"step": 100, "tokens": ...}), written by rank 0.
    """
    os.makedirs(path, exist_ok=True)
    if optimizer is not None:
        msd, osd = get_state_dict(model, optimizer)
        state = {"model": msd, "optim": osd}
    else:
        state = {"model": get_state_dict(model, [])[0]}
    dcp.save(state, checkpoint_id=path, no_dist=not _dist())
    if not _dist() or dist.get_rank() == 0:
        with open(os.path.join(path, TRAIN_STATE), "w") as f:
            json.dump(train_state or {}, f)
    if _dist():
        dist.barrier()


def load_checkpoint(path: str, model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None) -> Dict[str, Any]:
    """Load a checkpoint written by ``save_checkpoint`` on any number of ranks into ``model`` (and
    ``optimizer``) in place; wrap the model and build the optimizer first. Returns the train_state."""
    check(os.path.isdir(path), f"path must be a checkpoint directory, got {path!r}")
    if optimizer is not None:
        msd, osd = get_state_dict(model, optimizer)
        state = {"model": msd, "optim": osd}
    else:
        state = {"model": get_state_dict(model, [])[0]}
    dcp.load(state, checkpoint_id=path, no_dist=not _dist())
    if optimizer is not None:
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    else:
        set_state_dict(model, [], model_state_dict=state["model"], optim_state_dict={})
    meta = os.path.join(path, TRAIN_STATE)
    if os.path.exists(meta):
        with open(meta) as f:
            return json.load(f)
    return {}
