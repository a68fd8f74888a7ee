"""Context parallelism for MSA: one (packed) sequence split over the ranks of a process group.

Layout (``ZigzagLayout``): the T tokens of the global stream are cut into 2R near-equal contiguous
chunks; rank r holds chunk r followed by chunk 2R-1-r. Under causal attention an early chunk is cheap
and a late one expensive, so every rank gets one of each (the usual zigzag load balance). With
``cu_seqlens`` the packed stream is split the same way; a chunk may span several sequences.

Algorithm of ``context_parallel_msa_attention`` (one call per layer):

1. Every rank builds ONE sub-problem: for each of its two chunks, the token range from the start of the
   sequence holding the chunk's first token to the chunk's end (the only keys its queries can see);
   overlapping ranges merge; the ranges are concatenated as packed sequences. Its own queries sit at
   their rows; all other rows are zero padding. The public ops (``msa.select_blocks``,
   ``msa.sparse_attention``, ``msa.indexer_kl_loss``) take queries and keys of one length, so this is
   how a query gets its global position: selection, causal masks, block ids and forced (init / local)
   blocks are exactly those of the single-process run. Padded rows get only their local block (a
   1/topk share of a real row's attention cost); zero padded queries add zero to dK, dV and dk_idx.
2. K, V and the index keys k_idx of the sub-problem are fetched from their owners
   (``kv_exchange="fetch"``: one all-to-all whose sizes every rank derives from the layout, no extra
   sync) or all-gathered (``"allgather"``). Both are autograd functions: the backward sends dK, dV,
   dk_idx back to the rank that owns each token, summed over all ranks' queries.
3. The main branch output of the own rows is returned; the KL is computed on the sub-problem with the
   teacher lse of the same sparse attention call, rescaled to this rank's share of the global mean
   and all-reduced (its backward is the identity, so each rank's inputs receive exactly the gradient
   of the global KL).

Trade-offs (reasoned, not yet measured on GPUs):

* Fetch vs all-gather. All-gather moves 2 T H_kv d elements of K/V (plus T d_idx of index keys) to
  every rank. Fetch moves only the sub-problem's keys: for one long sequence rank r needs the prefix up
  to its late chunk, (2R - r) / 2R of T (on average ~3/4 of the all-gather volume, and nothing of its
  own rows); for packed short sequences only the sequences its tokens belong to. Fetching at block
  granularity (only blocks some local query selected) would save little more: with the zigzag layout
  every rank holds a late chunk whose queries may select any earlier block, so for long sequences the
  union of selected blocks approaches all blocks, while the sizes become data dependent (a host sync
  between selection and the exchange). Sequence-prefix fetch is the default.
* Padding. Rows of the sub-problem that are not this rank's (the sequence prefix before a chunk) are
  computed and dropped: ``msa.select_blocks`` scores them against their keys (the indexer costs
  O(L^2) on a sub-problem of length L <= T instead of O(T_local L)), and the warmup ("dense") mode's
  main branch and KL attend them densely. A query-position offset in the ops (queries at positions
  q_start.. over keys 0..) would remove this; the sparse main branch and sparse KL already pay only
  the local block for them.

Gradients of parameters: every rank's parameter gradients hold the contribution of its own tokens
(plus the KL term's share); sum them over the context-parallel group (e.g. DDP over the CP group with
the loss multiplied by the group size, since DDP averages) to get the full-sequence gradient.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import List, NamedTuple, Optional, Tuple

import torch
import torch.distributed as dist

from ..ops.common import check, check_block_args, check_cu_seqlens, check_float, check_tensor, default_scale
from ..ops.dense import dense_causal_attention
from ..ops.indexer_kl import indexer_kl_loss
from ..ops.select_blocks import select_blocks
from ..ops.sparse_attention import sparse_attention

MODES = ("dense", "sparse")
KV_EXCHANGES = ("fetch", "allgather")


# --------------------------------------------------------------------------------------------------
# layout
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ZigzagLayout:
    """Token ownership of a global stream of ``seqlen`` tokens over ``world_size`` ranks.

    The stream is cut into 2R chunks (the first ``seqlen % 2R`` chunks one token longer); rank r holds
    chunk r then chunk 2R-1-r, concatenated in that order along the token dimension.
    """

    seqlen: int
    world_size: int

    def __post_init__(self):
        check(isinstance(self.world_size, int) and self.world_size >= 1,
              f"world_size must be an int >= 1, got {self.world_size!r}")
        check(isinstance(self.seqlen, int) and self.seqlen >= 2 * self.world_size,
              f"seqlen must be an int >= 2 * world_size = {2 * self.world_size} (two chunks per rank), "
              f"got {self.seqlen!r}")

    def chunk_bounds(self) -> List[Tuple[int, int]]:
        """(start, end) of the 2R chunks in global token order."""
        n = 2 * self.world_size
        base, extra = divmod(self.seqlen, n)
        out, s = [], 0
        for c in range(n):
            e = s + base + (1 if c < extra else 0)
            out.append((s, e))
            s = e
        return out

    def rank_chunks(self, rank: int) -> List[Tuple[int, int]]:
        """The two (start, end) global token ranges of ``rank``, in local order."""
        check(0 <= rank < self.world_size, f"rank must be in [0, {self.world_size}), got {rank}")
        b = self.chunk_bounds()
        return [b[rank], b[2 * self.world_size - 1 - rank]]

    def local_len(self, rank: int) -> int:
        return sum(e - s for s, e in self.rank_chunks(rank))

    def max_local_len(self) -> int:
        return max(self.local_len(r) for r in range(self.world_size))

    def indices(self, rank: int, device=None) -> torch.Tensor:
        """int64 (local_len,): the global token index of each local row of ``rank``."""
        return torch.cat([torch.arange(s, e, device=device) for s, e in self.rank_chunks(rank)])

    def padded_source(self, device=None) -> torch.Tensor:
        """int64 (T,): for every global token, its row in the rank-major padded buffer
        (R * max_local_len rows) that an all-gather of the padded local shards produces."""
        m = self.max_local_len()
        src = torch.empty(self.seqlen, dtype=torch.int64, device=device)
        for r in range(self.world_size):
            idx = self.indices(r, device)
            src[idx] = r * m + torch.arange(idx.numel(), device=device)
        return src


def zigzag_shard(x: torch.Tensor, rank: int, world_size: int, dim: int = 1) -> torch.Tensor:
    """This rank's zigzag shard of a global tensor.

    Args:
        x: any tensor whose dimension ``dim`` is the global token dimension T (e.g. (B, T, H, D)).
        rank, world_size: position in the context-parallel group.
        dim: the token dimension.

    Returns:
        (..., local_len, ...) rows of chunks ``rank`` and ``2R-1-rank`` (a copy), same dtype.
    """
    check(isinstance(x, torch.Tensor), f"x must be a torch.Tensor, got {type(x).__name__}")
    layout = ZigzagLayout(x.shape[dim], world_size)
    return x.index_select(dim, layout.indices(rank, x.device))


def zigzag_positions(seqlen: int, rank: int, world_size: int, cu_seqlens: Optional[torch.Tensor] = None,
                     device=None) -> torch.Tensor:
    """int64 (local_len,): the position inside its own sequence of every local token (for RoPE).

    cu_seqlens: optional int32 (S+1,) offsets of the packed global stream.
    """
    g = ZigzagLayout(seqlen, world_size).indices(rank, device)
    if cu_seqlens is None:
        return g
    cu = cu_seqlens.to(device=g.device, dtype=torch.int64)
    return g - cu[torch.searchsorted(cu[1:], g, right=True)]


# --------------------------------------------------------------------------------------------------
# collectives with autograd
# --------------------------------------------------------------------------------------------------
def _group_info(group) -> Tuple[int, int]:
    return dist.get_rank(group), dist.get_world_size(group)


def _reduce_scatter_rows(full: torch.Tensor, rank: int, world: int, group) -> torch.Tensor:
    """Sum ``full`` (R * m, ...) over the group and return this rank's rows [rank*m, (rank+1)*m).
    NCCL has a reduce-scatter; gloo does not, so elsewhere it is an all-reduce plus a slice
    (twice the traffic; only the CPU tests take that path)."""
    m = full.shape[0] // world
    full = full.contiguous()
    if dist.get_backend(group) == "nccl":
        out = full.new_empty((m,) + tuple(full.shape[1:]))
        dist.reduce_scatter_tensor(out, full, group=group)
        return out
    dist.all_reduce(full, group=group)
    return full[rank * m:(rank + 1) * m]


class _GatherSequence(torch.autograd.Function):
    """Forward: local zigzag shards (B, n_r, ...) -> the global stream (B, T, ...) on every rank.
    Backward: the global gradient is summed over ranks and each rank keeps its own rows."""

    @staticmethod
    def forward(ctx, x, layout: ZigzagLayout, group):
        rank, world = _group_info(group)
        m = layout.max_local_len()
        n = x.shape[1]
        xt = x.movedim(1, 0)
        pad = xt.new_zeros((m,) + tuple(xt.shape[1:]))
        pad[:n] = xt
        parts = [torch.empty_like(pad) for _ in range(world)]
        dist.all_gather(parts, pad, group=group)
        src = layout.padded_source(x.device)
        ctx.layout, ctx.group, ctx.n, ctx.m = layout, group, n, m
        ctx.save_for_backward(src)
        return torch.cat(parts).index_select(0, src).movedim(0, 1)

    @staticmethod
    def backward(ctx, grad):
        (src,) = ctx.saved_tensors
        rank, world = _group_info(ctx.group)
        gt = grad.movedim(1, 0)
        full = gt.new_zeros((world * ctx.m,) + tuple(gt.shape[1:]))
        full.index_copy_(0, src, gt)
        mine = _reduce_scatter_rows(full, rank, world, ctx.group)[:ctx.n]
        return mine.movedim(0, 1), None, None


class _SumOverGroup(torch.autograd.Function):
    """Forward: all-reduce SUM of per-rank shares of one global scalar. Backward: identity, so each
    rank's own inputs get the gradient of the global value (every rank seeds the same upstream grad)."""

    @staticmethod
    def forward(ctx, x, group):
        y = x.clone()
        dist.all_reduce(y, group=group)
        return y

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def gather_sequence(x: torch.Tensor, seqlen: int, group=None) -> torch.Tensor:
    """All-gather zigzag shards into the global stream, differentiably.

    Args:
        x: (B, local_len, ...) this rank's zigzag shard (token dimension 1).
        seqlen: global number of tokens T.
        group: the context-parallel process group (None: the default group).

    Returns:
        (B, T, ...) the global tensor in token order, same dtype, on every rank. Its backward sums the
        gradient over ranks and returns each rank its own rows.
    """
    rank, world = _group_info(group)
    layout = ZigzagLayout(seqlen, world)
    check(x.dim() >= 2 and x.shape[1] == layout.local_len(rank),
          f"x must have shape (B, local_len={layout.local_len(rank)}, ...) for rank {rank} of {world} "
          f"with seqlen {seqlen}, got {tuple(x.shape)}")
    return _GatherSequence.apply(x, layout, group)


# --------------------------------------------------------------------------------------------------
# the layer-level entry
# --------------------------------------------------------------------------------------------------
class CPAttentionOutput(NamedTuple):
    """o: (B, local_len, H_q, D) main-branch output of the local tokens, in q.dtype.
    kl: fp32 scalar, the global indexer KL (identical on every rank), or None.
    block_indices: int32 (B, local_len, H_kv, topk) selection of the local tokens (block ids within
    each sequence), or None in dense mode."""

    o: torch.Tensor
    kl: Optional[torch.Tensor]
    block_indices: Optional[torch.Tensor]


def _global_seqlen(n_local: int, device, group) -> int:
    t = torch.tensor([n_local], dtype=torch.int64, device=device)
    dist.all_reduce(t, group=group)
    return int(t.item())


def _segments(layout: ZigzagLayout, rank: int, cu: Optional[List[int]]) -> List[Tuple[int, int]]:
    """Global token ranges rank's queries can see: for each local chunk, from the start of the sequence
    holding its first token to its end; overlapping ranges merged. Each range starts at a sequence start."""
    segs: List[List[int]] = []
    for a, b in layout.rank_chunks(rank):
        s0 = 0 if cu is None else max(c for c in cu[:-1] if c <= a)
        if segs and s0 <= segs[-1][1]:
            segs[-1][1] = max(segs[-1][1], b)
        else:
            segs.append([s0, b])
    return [(a, b) for a, b in segs]


@functools.lru_cache(maxsize=16)
def _plan(seqlen: int, world: int, cu: Optional[Tuple[int, ...]]):
    """Per rank: the global token ids of its sub-problem (the concatenated segments) and the sub-problem's
    cu_seqlens (None for one unpacked segment). CPU tensors; cached per (T, R, cu_seqlens)."""
    layout = ZigzagLayout(seqlen, world)
    cu_l = None if cu is None else list(cu)
    out = []
    for r in range(world):
        segs = _segments(layout, r, cu_l)
        ids = torch.cat([torch.arange(a, b) for a, b in segs])
        if cu_l is None:
            cu_sub = None
        else:
            bounds, off = {0, int(ids.numel())}, 0
            for a, b in segs:
                bounds.add(off)
                bounds.update(c - a + off for c in cu_l if a < c < b)
                off += b - a
            cu_sub = torch.tensor(sorted(bounds), dtype=torch.int32)
        out.append((ids, cu_sub))
    return out


@functools.lru_cache(maxsize=16)
def _local_rows(seqlen: int, world: int, cu: Optional[Tuple[int, ...]], rank: int) -> torch.Tensor:
    """int64 (local_len,): the sub-problem row of every local token of ``rank`` (CPU, cached)."""
    sub_ids = _plan(seqlen, world, cu)[rank][0]
    where = torch.full((seqlen,), -1, dtype=torch.int64)
    where[sub_ids] = torch.arange(sub_ids.numel())
    return where[ZigzagLayout(seqlen, world).indices(rank)]


@functools.lru_cache(maxsize=16)
def _fetch_meta(seqlen: int, world: int, cu: Optional[Tuple[int, ...]], rank: int):
    """The all-to-all of ``_FetchRows`` for one rank: which local rows it sends to each rank (in the
    receiver's sub-problem order), where the rows it receives go, and the split sizes. CPU, cached."""
    layout, plan = ZigzagLayout(seqlen, world), _plan(seqlen, world, cu)
    owner = torch.empty(seqlen, dtype=torch.int64)
    local_pos = torch.empty(seqlen, dtype=torch.int64)
    for r in range(world):
        idx = layout.indices(r)
        owner[idx] = r
        local_pos[idx] = torch.arange(idx.numel())
    mine = plan[rank][0]
    send_idx, in_splits, recv_pos, out_splits = [], [], [], []
    for j in range(world):
        want = plan[j][0]
        sel = want[owner[want] == rank]
        send_idx.append(local_pos[sel])
        in_splits.append(int(sel.numel()))
        pos = torch.nonzero(owner[mine] == j).flatten()
        recv_pos.append(pos)
        out_splits.append(int(pos.numel()))
    return torch.cat(send_idx), in_splits, torch.cat(recv_pos), out_splits, int(mine.numel())


class _FetchRows(torch.autograd.Function):
    """Forward: every rank receives the rows of its sub-problem (``_plan``) from their owners, one
    all_to_all_single whose sizes every rank knows from the layout (no extra sync). Backward: the
    reverse all-to-all; each owner sums the gradients its rows received from all ranks."""

    @staticmethod
    def forward(ctx, x, meta, group):
        send_idx, in_splits, recv_pos, out_splits, length = meta
        send_idx, recv_pos = send_idx.to(x.device), recv_pos.to(x.device)
        send = x.movedim(1, 0).index_select(0, send_idx).contiguous()
        recv = send.new_empty((sum(out_splits),) + tuple(send.shape[1:]))
        dist.all_to_all_single(recv, send, out_splits, in_splits, group=group)
        full = recv.new_empty((length,) + tuple(recv.shape[1:]))
        full[recv_pos] = recv
        ctx.save_for_backward(send_idx, recv_pos)
        ctx.in_splits, ctx.out_splits, ctx.n, ctx.group = in_splits, out_splits, x.shape[1], group
        return full.movedim(0, 1)

    @staticmethod
    def backward(ctx, grad):
        send_idx, recv_pos = ctx.saved_tensors
        g = grad.movedim(1, 0).index_select(0, recv_pos).contiguous()
        back = g.new_empty((sum(ctx.in_splits),) + tuple(g.shape[1:]))
        dist.all_to_all_single(back, g, ctx.in_splits, ctx.out_splits, group=ctx.group)
        out = g.new_zeros((ctx.n,) + tuple(g.shape[1:]))
        out.index_add_(0, send_idx, back)
        return out.movedim(0, 1), None, None


def context_parallel_msa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_idx: torch.Tensor,
                                   k_idx: torch.Tensor, group=None, *, block_size: int = 128, topk: int = 16,
                                   init_blocks: int = 0, local_blocks: int = 1, scale: Optional[float] = None,
                                   index_scale: Optional[float] = None, cu_seqlens: Optional[torch.Tensor] = None,
                                   seqlen: Optional[int] = None, mode: str = "sparse", compute_kl: bool = True,
                                   kv_exchange: str = "fetch", backend: str = "auto") -> CPAttentionOutput:
    """MSA (index branch, main branch, indexer KL) of one sequence split over a process group.

    Every argument tensor is this rank's zigzag shard (``zigzag_shard``) of the global tensor; call it
    on every rank of ``group`` with the same keyword arguments. Results equal the single-process
    ``select_blocks`` + ``sparse_attention`` (or dense attention) + ``indexer_kl_loss`` on the global
    tensors, rows in this rank's local order.

    Args:
        q: (B, n, H_q, D) queries of the local tokens (after RoPE at their global positions).
        k, v: (B, n, H_kv, D) keys and values of the local tokens, same dtype as q.
        q_idx: (B, n, H_kv, D_idx) index queries of the local tokens.
        k_idx: (B, n, D_idx) index keys of the local tokens. Both may be None for a dense layer without
            index branch (mode="dense", compute_kl=False).
        group: the context-parallel process group (None: the default group).
        block_size, topk, init_blocks, local_blocks: selection, as in ``msa.select_blocks``.
        scale: main attention scale (default D ** -0.5). index_scale: index score scale (default D_idx ** -0.5).
        cu_seqlens: optional int32 (S+1,) offsets of the packed GLOBAL stream (same on every rank; B must be 1).
        seqlen: global token count T; default cu_seqlens[-1], else the sum of the local lengths
            (one all-reduce). n must equal ``ZigzagLayout(T, R).local_len(rank)``.
        mode: "sparse" (selected blocks) or "dense" (warmup: full causal attention, full-support KL).
        compute_kl: compute the indexer KL (gradients reach q_idx and k_idx only).
        kv_exchange: "fetch" (default: each rank receives only the keys of the sequence prefixes its
            queries can see, one all-to-all) or "allgather" (every rank receives all keys).
        backend: "auto", "reference" or "triton" for the MSA ops.

    Returns:
        CPAttentionOutput(o (B, n, H_q, D), kl fp32 scalar or None, block_indices int32 (B, n, H_kv, topk)
        or None). Backward returns dq, dq_idx for the local rows and dk, dv, dk_idx summed over all
        ranks' queries, to the rank that owns each key.
    """
    check(dist.is_available() and dist.is_initialized(),
          "context_parallel_msa_attention needs an initialized torch.distributed process group")
    check_tensor("q", q, 4, "(B, n, H_q, D)")
    check_tensor("k", k, 4, "(B, n, H_kv, D)")
    check_tensor("v", v, 4, "(B, n, H_kv, D)")
    no_index = q_idx is None and k_idx is None
    check(not no_index or (mode == "dense" and not compute_kl),
          "q_idx and k_idx may be None only for mode='dense' with compute_kl=False (a layer without index branch)")
    if no_index:  # dense GQA layer: zero-width index tensors keep the code below uniform
        q_idx = q.new_zeros(q.shape[0], q.shape[1], k.shape[2], 1)
        k_idx = q.new_zeros(q.shape[0], q.shape[1], 1)
    check_tensor("q_idx", q_idx, 4, "(B, n, H_kv, D_idx)")
    check_tensor("k_idx", k_idx, 3, "(B, n, D_idx)")
    for name, x in (("q", q), ("k", k), ("v", v), ("q_idx", q_idx), ("k_idx", k_idx)):
        check_float(name, x)
    bsz, n, hq, d = q.shape
    hkv = k.shape[2]
    di = q_idx.shape[3]
    check(k.shape == (bsz, n, hkv, d), f"k must have shape (B, n, H_kv, D) with (B, n, D) = {(bsz, n, d)}, "
                                       f"got {tuple(k.shape)}")
    check(v.shape == k.shape, f"v must have the shape of k {tuple(k.shape)}, got {tuple(v.shape)}")
    check(hq % hkv == 0, f"H_q ({hq}) must be divisible by H_kv ({hkv})")
    check(q_idx.shape == (bsz, n, hkv, di), f"q_idx must have shape (B, n, H_kv, D_idx) = {(bsz, n, hkv, di)}, "
                                            f"got {tuple(q_idx.shape)}")
    check(k_idx.shape == (bsz, n, di), f"k_idx must have shape (B, n, D_idx) = {(bsz, n, di)}, got {tuple(k_idx.shape)}")
    check(k.dtype == q.dtype and v.dtype == q.dtype, f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    check(len({x.device for x in (q, k, v, q_idx, k_idx)}) == 1, "q, k, v, q_idx, k_idx must be on one device")
    check(mode in MODES, f"mode must be one of {MODES}, got {mode!r}")
    check(kv_exchange in KV_EXCHANGES, f"kv_exchange must be one of {KV_EXCHANGES}, got {kv_exchange!r}")
    check_block_args(block_size, topk, init_blocks, local_blocks)
    rank, world = _group_info(group)
    check(rank >= 0, "this process is not a member of group")
    cu_list = None
    if cu_seqlens is not None:
        check_tensor("cu_seqlens", cu_seqlens, 1, "(num_seqs + 1,)")
        total = int(cu_seqlens[-1])
        check(seqlen is None or seqlen == total, f"seqlen ({seqlen}) must equal cu_seqlens[-1] ({total})")
        seqlen = total
        check_cu_seqlens(cu_seqlens, bsz, seqlen)
        cu_list = [int(c) for c in cu_seqlens.detach().cpu().tolist()]
    elif seqlen is None:
        seqlen = _global_seqlen(n, q.device, group)
    check(isinstance(seqlen, int) and seqlen >= 2 * world,
          f"seqlen must be an int >= 2 * world_size = {2 * world}, got {seqlen!r}")
    layout = ZigzagLayout(seqlen, world)
    check(n == layout.local_len(rank),
          f"q must hold this rank's zigzag shard: rank {rank} of {world} with seqlen {seqlen} owns "
          f"{layout.local_len(rank)} tokens (zigzag_shard), got n = {n}")
    scale = default_scale(scale, d)
    index_scale = default_scale(index_scale, di, "index_scale")
    dev = q.device

    # (1) the sub-problem: the rank's segments (sequence prefixes its queries can see) concatenated as
    # a packed problem; its own queries sit at their rows, every other row is zero padding
    cu_key = None if cu_list is None else tuple(cu_list)
    plan = _plan(seqlen, world, cu_key)
    sub_ids, cu_sub = plan[rank]
    length = int(sub_ids.numel())
    cu_sub_dev = None if cu_sub is None else cu_sub.to(dev)
    rows = _local_rows(seqlen, world, cu_key, rank).to(dev)    # local token -> sub-problem row

    # (2) keys, values and index keys of the sub-problem; the backward returns their grads to the owners
    if kv_exchange == "fetch":
        meta = _fetch_meta(seqlen, world, cu_key, rank)
        fetch = lambda x: _FetchRows.apply(x, meta, group)  # noqa: E731
    else:
        sub_dev = sub_ids.to(dev)
        fetch = lambda x: _GatherSequence.apply(x, layout, group).index_select(1, sub_dev)  # noqa: E731
    k_s, v_s = fetch(k), fetch(v)
    q_s = q.new_zeros(bsz, length, hq, d).index_copy(1, rows, q)
    if not no_index:
        k_idx_s = fetch(k_idx)
        q_idx_s = q_idx.new_zeros(bsz, length, hkv, di).index_copy(1, rows, q_idx)

    bi_s = lse_s = None
    if mode == "sparse":
        bi_s = select_blocks(q_idx_s.detach(), k_idx_s.detach(), block_size=block_size, topk=topk,
                             init_blocks=init_blocks, local_blocks=local_blocks, scale=index_scale,
                             cu_seqlens=cu_sub_dev, backend=backend)
        # padded rows keep only their local block (first slot = the last valid one), so they cost 1/topk
        # of a real row in the main branch and the KL; they are dropped from every result
        pad = torch.ones(length, dtype=torch.bool, device=dev)
        pad[rows] = False
        pos = torch.arange(length, device=dev)
        if cu_sub is not None:
            cu_d = cu_sub_dev.to(torch.int64)
            pos = pos - cu_d[torch.searchsorted(cu_d[1:], pos, right=True)]
        pad_sel = torch.full((length, hkv, topk), -1, dtype=torch.int32, device=dev)
        pad_sel[:, :, 0] = (pos // block_size).to(torch.int32).view(-1, 1)
        bi_s = torch.where(pad.view(1, -1, 1, 1), pad_sel.unsqueeze(0), bi_s)
        o_s, lse_s = sparse_attention(q_s, k_s, v_s, bi_s, block_size=block_size, scale=scale,
                                      cu_seqlens=cu_sub_dev, return_lse=True, backend=backend)
    else:
        o_s = dense_causal_attention(q_s, k_s, v_s, scale=scale, cu_seqlens=cu_sub_dev)
    o = o_s.index_select(1, rows)

    # (3) the KL: the mean over the sub-problem's rows times length / T is this rank's share of the
    # global mean (padded rows add exactly zero gradient and, up to rounding, zero value)
    kl = None
    if compute_kl:
        kl_s = indexer_kl_loss(q_idx_s, k_idx_s, q_s.detach(), k_s.detach(), bi_s, block_size=block_size,
                               scale=scale, index_scale=index_scale, cu_seqlens=cu_sub_dev, backend=backend,
                               teacher_lse=None if lse_s is None else lse_s.detach())
        kl = _SumOverGroup.apply(kl_s * (length / seqlen), group)
    bi = None if bi_s is None else bi_s.index_select(1, rows)
    return CPAttentionOutput(o, kl, bi)


def context_parallel_layer_forward(layer, x: torch.Tensor, group=None, *, cu_seqlens: Optional[torch.Tensor] = None,
                                   seqlen: Optional[int] = None, compute_kl: Optional[bool] = None):
    """Run an ``msa.MSAAttention`` layer on this rank's zigzag shard of the hidden states.

    Args:
        layer: an ``MSAAttention`` in "dense" or "sparse" mode (a layer without index branch runs dense).
        x: (B, n, hidden_size) this rank's zigzag shard (``zigzag_shard``) of the global hidden states.
        group, cu_seqlens, seqlen: as in ``context_parallel_msa_attention`` (cu_seqlens of the global stream).
        compute_kl: default ``layer.training and torch.is_grad_enabled()``.

    Returns:
        ``msa.layers.attention.MSAOutput``: hidden (B, n, hidden_size), kl (global, fp32) or None,
        block_indices int32 (B, n, H_kv, topk) or None. RoPE uses every token's position in its global
        sequence. Parameter gradients are this rank's share: their sum over the group is the gradient
        of the single-process layer.
    """
    from ..layers.attention import MSAOutput
    c = layer.config
    check(x.dim() == 3 and x.shape[-1] == c.hidden_size,
          f"x must have shape (B, n, hidden_size={c.hidden_size}), got {tuple(x.shape)}")
    bsz, n, _ = x.shape
    rank, world = _group_info(group)
    if cu_seqlens is not None:
        seqlen = int(cu_seqlens[-1])
    elif seqlen is None:
        seqlen = _global_seqlen(n, x.device, group)
    pos = zigzag_positions(seqlen, rank, world, cu_seqlens, x.device)
    check(pos.numel() == n, f"x must hold this rank's zigzag shard of {seqlen} tokens ({pos.numel()} rows), got n = {n}")
    q, k, v, q_idx, k_idx = layer.project(x, pos.view(1, n).expand(bsz, n))
    if compute_kl is None:
        compute_kl = layer.training and torch.is_grad_enabled()
    compute_kl = bool(compute_kl) and c.use_index
    out = context_parallel_msa_attention(
        q, k, v, q_idx, k_idx, group, block_size=c.block_size, topk=c.topk_blocks, init_blocks=c.init_blocks,
        local_blocks=c.local_blocks, scale=c.head_dim ** -0.5, index_scale=c.index_dim ** -0.5,
        cu_seqlens=cu_seqlens, seqlen=seqlen, mode=layer.mode, compute_kl=compute_kl, backend=c.backend)
    hidden = layer.o_proj(out.o.reshape(bsz, n, c.num_heads * c.head_dim))
    return MSAOutput(hidden, out.kl, out.block_indices)
