"""Multi-process MSA: context parallelism (one sequence over several ranks) and DDP / FSDP2 helpers
for training (wrapping, optimizer groups, DTensor-aware clipping, resharding checkpoints, data
sharding). Everything runs on any torch.distributed backend (gloo on the CPU, NCCL on GPUs)."""

from .checkpoint import load_checkpoint, save_checkpoint
from .context import (CPAttentionOutput, ZigzagLayout, context_parallel_layer_forward,
                      context_parallel_msa_attention, gather_sequence,
                      zigzag_positions, zigzag_shard)
from .cp_training import (allreduce_gradients, cp_lm_loss, cp_split_batch, cp_training_step,
                          disable_context_parallel, enable_context_parallel)
from .data import ShardedSampler, num_windows, token_windows
from .training import (autocast_context, build_optimizer, clip_grad_norm_, clip_grad_norms, lm_loss,
                       mean_over_ranks, split_parameters, training_step, unwrap, wrap_model)

__all__ = ["CPAttentionOutput", "ZigzagLayout", "context_parallel_msa_attention", "context_parallel_layer_forward",
           "gather_sequence",
           "zigzag_positions", "zigzag_shard", "save_checkpoint", "load_checkpoint", "ShardedSampler",
           "token_windows", "num_windows", "wrap_model", "unwrap", "autocast_context", "build_optimizer",
           "split_parameters", "clip_grad_norm_", "clip_grad_norms", "lm_loss", "training_step",
           "mean_over_ranks", "enable_context_parallel", "disable_context_parallel", "cp_split_batch",
           "cp_lm_loss", "cp_training_step", "allreduce_gradients"]
