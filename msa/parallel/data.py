"""Data sharding by rank without overlap, resumable on a different number of ranks.

``ShardedSampler`` fixes one global order of sample ids (a seeded permutation per epoch) and cuts it
into global batches of ``global_batch_size``; at step s rank r takes the r-th contiguous slice of
global batch s. The ranks of a step never share a sample, an epoch never repeats one, and the global
batch of a step does not depend on the world size: a run resumed at step s on R' ranks (same seed and
global batch) continues with exactly the samples the R-rank run would have used.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..ops.common import check


class ShardedSampler:
    """Sample ids of this rank for every global step.

    Args:
        num_samples: size of the dataset (e.g. number of token windows).
        global_batch_size: samples per optimizer step over all ranks; a multiple of world_size.
        rank, world_size: this rank in the data-parallel group.
        seed: permutation seed (the same on every rank). shuffle: False keeps the natural order.

    The last ``num_samples % global_batch_size`` samples of each epoch's order are skipped (every
    step has a full global batch).
    """

    def __init__(self, num_samples: int, global_batch_size: int, rank: int, world_size: int, *,
                 seed: int = 0, shuffle: bool = True):
        check(isinstance(world_size, int) and world_size >= 1, f"world_size must be an int >= 1, got {world_size!r}")
        check(isinstance(rank, int) and 0 <= rank < world_size, f"rank must be in [0, {world_size}), got {rank!r}")
        check(isinstance(global_batch_size, int) and global_batch_size >= 1 and global_batch_size % world_size == 0,
              f"global_batch_size must be a positive multiple of world_size ({world_size}), got {global_batch_size!r}")
        check(isinstance(num_samples, int) and num_samples >= global_batch_size,
              f"num_samples must be an int >= global_batch_size ({global_batch_size}), got {num_samples!r}")
        self.num_samples, self.global_batch_size = num_samples, global_batch_size
        self.rank, self.world_size = rank, world_size
        self.seed, self.shuffle = seed, shuffle
        self.steps_per_epoch = num_samples // global_batch_size
        self._epoch: Optional[int] = None
        self._perm: Optional[torch.Tensor] = None

    @property
    def local_batch_size(self) -> int:
        return self.global_batch_size // self.world_size

    def _order(self, epoch: int) -> torch.Tensor:
        if self._epoch != epoch:
            if self.shuffle:
                g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
                self._perm = torch.randperm(self.num_samples, generator=g)
            else:
                self._perm = torch.arange(self.num_samples)
            self._epoch = epoch
        return self._perm

    def global_batch(self, step: int) -> torch.Tensor:
        """int64 (global_batch_size,): the sample ids of global step ``step`` (all ranks)."""
        check(isinstance(step, int) and step >= 0, f"step must be an int >= 0, got {step!r}")
        epoch, s = divmod(step, self.steps_per_epoch)
        gb = self.global_batch_size
        return self._order(epoch)[s * gb:(s + 1) * gb]

    def indices(self, step: int) -> torch.Tensor:
        """int64 (local_batch_size,): this rank's sample ids at global step ``step``."""
        lb = self.local_batch_size
        return self.global_batch(step)[self.rank * lb:(self.rank + 1) * lb]


def token_windows(tokens: torch.Tensor, ids: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Windows of a 1-D token stream: sample i is tokens[i * seq_len : i * seq_len + seq_len + 1]
    (inputs and next-token targets of one training sequence; neighbouring windows share one token).

    Args:
        tokens: int (N,) token ids. ids: int64 (b,) window ids, each < (N - 1) // seq_len. seq_len: T.
    Returns:
        int64 (b, seq_len + 1).
    """
    check(tokens.dim() == 1, f"tokens must be 1-D (N,), got {tuple(tokens.shape)}")
    check(isinstance(seq_len, int) and seq_len >= 1, f"seq_len must be a positive int, got {seq_len!r}")
    n = num_windows(tokens.numel(), seq_len)
    check(ids.numel() == 0 or (int(ids.min()) >= 0 and int(ids.max()) < n),
          f"ids must be window ids in [0, {n}) for {tokens.numel()} tokens and seq_len {seq_len}")
    off = ids.to(torch.int64).view(-1, 1) * seq_len + torch.arange(seq_len + 1).view(1, -1)
    return tokens.to(torch.int64)[off.to(tokens.device)]


def num_windows(num_tokens: int, seq_len: int) -> int:
    """How many (seq_len + 1)-token windows ``token_windows`` can cut from num_tokens tokens."""
    return max(0, (num_tokens - 1) // seq_len)
