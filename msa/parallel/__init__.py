"""Multi-process MSA: context parallelism (one sequence over several ranks) and DDP / FSDP2 helpers
for training (wrapping, optimizer groups, DTensor-aware clipping, resharding checkpoints, data
sharding). Everything runs on any torch.distributed backend (gloo on the CPU, NCCL on GPUs)."""

from .context import (CPAttentionOutput, ZigzagLayout, context_parallel_msa_attention, gather_sequence,
                      zigzag_positions, zigzag_shard)

__all__ = ["CPAttentionOutput", "ZigzagLayout", "context_parallel_msa_attention", "gather_sequence",
           "zigzag_positions", "zigzag_shard"]
