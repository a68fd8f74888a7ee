"""Page allocator: hand-out order, all-or-nothing allocation, release, fixed tables, device copy."""

import pytest
import torch

from msa.cache import PageAllocator


def test_allocate_release_and_device_copy():
    a = PageAllocator(batch_size=2, pages_per_seq=4, num_pages=5, device=torch.device("cpu"))
    a.ensure([2, 1])
    assert a.table_host.tolist() == [[0, 1, -1, -1], [2, -1, -1, -1]]
    assert torch.equal(a.table, a.table_host) and a.free_pages == 2
    a.ensure([1, 3])  # shrinking never frees; row 1 grows by two
    assert a.table_host[1].tolist() == [2, 3, 4, -1] and a.num_allocated(0) == 2
    with pytest.raises(ValueError, match="ran out of pages"):
        a.ensure([4, 3])  # needs 2, 0 free: nothing changes
    assert a.num_allocated(0) == 2 and a.free_pages == 0
    a.release([1])
    assert a.table_host[1].tolist() == [-1] * 4 and a.free_pages == 3 and torch.equal(a.table, a.table_host)
    a.ensure([3, 0])  # released pages are handed out again, lowest first
    assert a.table_host[0].tolist() == [0, 1, 2, -1]


def test_fixed_table_is_never_changed_and_is_validated():
    pt = torch.tensor([[3, 1], [0, 2]], dtype=torch.int32)
    a = PageAllocator(2, 2, 4, torch.device("cpu"), page_table=pt)
    a.ensure([2, 2])
    a.release([0])
    assert torch.equal(a.table_host, pt) and torch.equal(a.table, pt)
    with pytest.raises(ValueError, match="num_pages"):
        PageAllocator(2, 2, 3, torch.device("cpu"), page_table=pt)
    with pytest.raises(ValueError, match="too short"):
        PageAllocator(2, 3, 4, torch.device("cpu"), page_table=pt)
