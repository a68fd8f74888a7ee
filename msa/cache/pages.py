"""Page allocator of the paged cache: a free list of physical pages and the page table shared by all layers.

Sequence ``row`` owns the pages ``table[row, :num_allocated(row)]`` (logical page j of the sequence is
physical page ``table[row, j]``); unallocated entries are -1. Pages come from a free list as sequences
grow (page 0 first) and go back to it on ``release``. A fixed table given by the caller is never
changed (every entry is treated as allocated).

The host table is the source of truth; the device copy ``table`` (what the kernels read) is refreshed
with one copy after each change, never inside a decode step: ``ensure`` for every token a step will
write must happen before a CUDA graph capture (``MSACache.reserve``).
"""

from __future__ import annotations

from typing import Iterable, List, Optional

import torch

from ..ops.common import check


class PageAllocator:
    """Args:
        batch_size: sequences (rows of the table).
        pages_per_seq: logical pages per sequence (columns of the table).
        num_pages: physical pages in the pool.
        device: where the device copy of the table lives.
        page_table: optional int32/int64 (batch_size, >= pages_per_seq) fixed assignment, entries in
            [0, num_pages).
    """

    def __init__(self, batch_size: int, pages_per_seq: int, num_pages: int, device: torch.device,
                 page_table: Optional[torch.Tensor] = None):
        check(isinstance(num_pages, int) and num_pages > 0, f"num_pages must be a positive int, got {num_pages!r}")
        self.batch_size, self.pages_per_seq, self.num_pages = batch_size, pages_per_seq, num_pages
        if page_table is not None:
            check(isinstance(page_table, torch.Tensor) and page_table.dim() == 2,
                  "page_table must be an int32 tensor of shape (batch_size, ceil(max_seq_len / page_size))")
            check(page_table.dtype in (torch.int32, torch.int64), f"page_table must be int32, got {page_table.dtype}")
            check(page_table.shape[0] == batch_size,
                  f"page_table must have batch_size={batch_size} rows, got {page_table.shape[0]}")
            check(page_table.shape[1] >= pages_per_seq,
                  f"page_table is too short: {page_table.shape[1]} pages per sequence, {pages_per_seq} needed")
            host = page_table.detach().to("cpu", torch.int32).clone()
            check(bool(((host >= 0) & (host < num_pages)).all()),
                  f"page_table entries must be in [0, num_pages={num_pages})")
            self.fixed = True
            self._free: List[int] = []
            self._num_alloc = [host.shape[1]] * batch_size
        else:
            host = torch.full((batch_size, pages_per_seq), -1, dtype=torch.int32)
            self.fixed = False
            self._free = list(range(num_pages - 1, -1, -1))  # pop() hands out page 0 first
            self._num_alloc = [0] * batch_size
        self.table_host = host
        self.table = host.to(device)

    @property
    def free_pages(self) -> int:
        return len(self._free)

    def num_allocated(self, row: int) -> int:
        return self._num_alloc[row]

    def ensure(self, pages: Iterable[int]) -> None:
        """Give every row r at least ``pages[r]`` pages (one entry per row). All or nothing: raises
        before allocating anything when the pool is too small."""
        pages = list(pages)
        check(len(pages) == self.batch_size, f"pages must hold batch_size={self.batch_size} entries")
        need = [max(0, p - self._num_alloc[r]) for r, p in enumerate(pages)]
        if self.fixed or sum(need) == 0:
            return
        check(max(pages) <= self.pages_per_seq,
              f"a sequence would need {max(pages)} pages, more than the table's {self.pages_per_seq}")
        check(sum(need) <= len(self._free),
              f"the paged cache ran out of pages (num_pages={self.num_pages}): {sum(need)} more needed, "
              f"{len(self._free)} free")
        for r, n in enumerate(need):
            if n:
                have = self._num_alloc[r]
                self.table_host[r, have:have + n] = torch.tensor([self._free.pop() for _ in range(n)],
                                                                 dtype=torch.int32)
                self._num_alloc[r] = have + n
        self.table.copy_(self.table_host)

    def release(self, rows: Iterable[int]) -> None:
        """Return the pages of ``rows`` to the free list (no-op for a fixed table)."""
        if self.fixed:
            return
        changed = False
        for r in rows:
            pages = self.table_host[r, : self._num_alloc[r]].tolist()
            self._free.extend(reversed(pages))
            self.table_host[r] = -1
            self._num_alloc[r] = 0
            changed = changed or bool(pages)
        if changed:
            self.table.copy_(self.table_host)
