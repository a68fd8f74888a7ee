"""Triton MSA decode: a plan / run split so a whole decode step can be captured in a CUDA graph.

``DecodePlan`` validates the shapes once and allocates every buffer (block scores, top-k candidates,
the selection, split-K partials, the output) for a fixed batch, number of new tokens per sequence
and cache capacity. ``run()`` only launches kernels: no host sync, no allocation, grids that do not
depend on the current lengths (the kernels read ``cache.lengths_dev`` on the device). Outputs live
in the plan's buffers and are overwritten by the next run.

Example (one layer; the same plan serves every layer of the same shape)::

    cache = MSACache(n_layers, B, max_len, H_kv, D, D_idx, dtype=torch.bfloat16, device="cuda",
                     page_size=128, index_dtype=torch.float8_e4m3fn)
    ... prefill with cache.append(...) ...
    cache.reserve(max_len)                                   # paged: pages must exist before capture
    plan = DecodePlan(cache, num_heads=64, num_tokens=1, block_size=128, topk=16)
    q, q_idx = torch.empty(B, 1, 64, D, ...), torch.empty(B, 1, H_kv, D_idx, ...)   # static inputs
    k_new, v_new, kidx_new = ...                                                  # static inputs
    def step():
        cache.append_device(0, k_new, v_new, kidx_new)        # device-side lengths += 1
        return plan.run(q, q_idx, 0)                          # -> (o (B,1,64,D), block_indices)
    torch.cuda.synchronize(); s = torch.cuda.Stream()
    with torch.cuda.stream(s):                                # warm up (compiles the kernels)
        step()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        o, sel = step()
    # each decode step: write q, q_idx, k_new, ... in place, then
    graph.replay()
    cache.sync_lengths()                                      # only if host code needs seq_lens
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from ... import tuning
from ..common import check, interpreting
from . import triton_kernels as tk

FUSED_MAX_BLOCKS = 128   # blocks per index program whose maxima the fused chain keeps in registers
FUSED_MAX_CAND = 8192    # packed candidates per row the fused attention merges in registers


def _pow2(x: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(1, x))))


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 8


class DecodePlan:
    """Buffers and launch geometry of MSA decode over ``cache`` (contiguous or paged, bf16/fp8 index keys).

    Args:
        cache: an ``msa.MSACache``; a paged cache needs ``page_size == block_size``.
        num_heads: H_q (a multiple of the cache's H_kv; G = H_q / H_kv in 1..64 and beyond).
        block_size, topk, init_blocks, local_blocks: the selection (spec section 1).
        num_tokens: t, new query tokens per sequence per step (1..16 typical; any t >= 1 works).
        scale / index_scale: default D ** -0.5 / D_idx ** -0.5.
        dense: attend to every block (warmup-mode / dense layers); no index keys are read.
        max_seq_len: capacity in tokens (default the cache's max_seq_len); sets the grids.
        out_dtype: dtype of o (default the cache dtype).
        fused: None (default) picks by capacity: fused up to 256K tokens, legacy beyond (H200 timings).
            True: 2 launches (index + per-range top-k, then attention that merges the
            candidates itself), a 3rd (split merge) only when the attention has several splits.
            False: the legacy chain index -> top-k -> top-k merge -> attention -> merge (comparison).
            The fused chain falls back to the legacy one (``plan.fused`` False) when the candidates
            would not fit its bounds (more than 8192 per row or 256 blocks per index program, i.e.
            beyond ~16M-token contexts at block 128).
        topk_chunk, index_blocks_per_program, attention_splits: launch-geometry overrides (tests / tuning):
            blocks per top-k program (power of two, legacy chain), blocks per index program (the fused
            chain caps it at 128), splits of the attention (1 = no merge launch in the fused chain).
        index_tile_blocks, index_num_stages, index_programs_per_sm: index-kernel tuning (blocks per
            loaded tile, software-pipeline depth, programs per SM of the single wave); defaults:
            1 / 3 for bf16 keys, 2 / 3 for fp8 keys at d_idx * block_size <= 16K, 2 programs per SM.
        select_in_attention: legacy chain with several top-k chunks: every attention program merges the
            chunks' candidates itself (as the fused chain's attention does), so there is no top-k merge
            launch. Off by default: its gain is within the run-to-run spread (docs/perf-notes.md).
            With one split the attention writes the output itself.

    run(q (B, t, H_q, D), q_idx (B, t, H_kv, D_idx) or None, layer_idx) -> (o (B, t, H_q, D),
    block_indices int32 (B, t, H_kv, topk) or None when dense). q is cast to nothing: it must have
    the cache dtype; q_idx must have the cache dtype (bf16 queries also for fp8 index keys).
    """

    def __init__(self, cache, *, num_heads: int, block_size: int, topk: int, init_blocks: int = 0,
                 local_blocks: int = 1, num_tokens: int = 1, scale: Optional[float] = None,
                 index_scale: Optional[float] = None, dense: bool = False, max_seq_len: Optional[int] = None,
                 out_dtype: Optional[torch.dtype] = None, topk_chunk: Optional[int] = None,
                 index_blocks_per_program: Optional[int] = None, attention_splits: Optional[int] = None,
                 index_tile_blocks: Optional[int] = None, index_num_stages: Optional[int] = None,
                 index_programs_per_sm: Optional[int] = None, fused: Optional[bool] = None,
                 select_in_attention: bool = False):
        c = cache
        if fused is None:
            # H200: the fused chain wins at 128K (31 vs 35 us),
            # the legacy chain at 1M (94 vs 100 us, bf16 keys), where the index kernel dominates
            fused = (max_seq_len or c.max_seq_len) <= (1 << 18)
        check(num_heads % c.num_kv_heads == 0,
              f"num_heads ({num_heads}) must be a multiple of the cache's num_kv_heads ({c.num_kv_heads})")
        check(isinstance(num_tokens, int) and num_tokens >= 1, f"num_tokens must be an int >= 1, got {num_tokens!r}")
        check(isinstance(select_in_attention, bool), f"select_in_attention must be a bool, got {select_in_attention!r}")
        check(not c.paged or c.page_size == block_size,
              f"block_size ({block_size}) must equal the paged cache's page_size ({c.page_size})")
        check(block_size >= 16 and block_size & (block_size - 1) == 0,
              f"block_size must be a power of two >= 16 for the Triton decode kernels, got {block_size}")
        check(dense or c.index_dim is not None, "the cache stores no index keys (index_dim=None): use dense=True")
        check(not c.fp8_index or c.index_scale_mode != "block" or c.index_block_size == block_size,
              f"per-block fp8 index scales use blocks of {c.index_block_size} tokens, block_size is {block_size}")
        self.cache, self.dense = c, dense
        self.B, self.T, self.HQ, self.H = c.batch_size, num_tokens, num_heads, c.num_kv_heads
        self.G, self.D, self.DI = num_heads // c.num_kv_heads, c.head_dim, c.index_dim
        self.block_size, self.topk = block_size, topk
        self.init_blocks, self.local_blocks = init_blocks, local_blocks
        self.scale = self.D ** -0.5 if scale is None else float(scale)
        self.index_scale = (self.DI or 1) ** -0.5 if index_scale is None else float(index_scale)
        self.max_seq_len = c.max_seq_len if max_seq_len is None else max_seq_len
        check(self.max_seq_len <= c.max_seq_len, "max_seq_len must not exceed the cache's max_seq_len")
        self.out_dtype = c.dtype if out_dtype is None else out_dtype
        self.f32 = interpreting() or c.dtype in (torch.float32, torch.float64)
        dev = c.device
        self.nb_cap = math.ceil(self.max_seq_len / block_size)
        nsm = _num_sms(dev)
        B, T, H, HQ, D = self.B, self.T, self.H, self.HQ, self.D
        self.s_rows = max(1, c.rows_per_seq)
        self.pt_stride = c.page_table.shape[1] if c.paged else 0

        # index kernel geometry: rows = T * H per sequence; keys streamed in tiles of NBT blocks (fp8:
        # two blocks, so a tile is 32 KB like a bf16 block at d_idx 128); the tiles are split over
        # about ``index_programs_per_sm`` resident programs per SM in ONE wave (every program the same
        # size: no wave-quantisation tail on the stream that dominates the step at long contexts).
        if not dense:
            self.idx_rows = max(16, min(64, _pow2(T * H)))
            self.idx_row_tiles = math.ceil(T * H / self.idx_rows)
            ebytes = c.k_idx[0].element_size() if c.k_idx[0] is not None else 2
            self.idx_nbt = index_tile_blocks or (2 if ebytes == 1 and (self.DI or 0) * block_size <= 16384 else 1)
            check(self.idx_nbt >= 1 and self.idx_nbt & (self.idx_nbt - 1) == 0,
                  f"index_tile_blocks must be a power of two, got {self.idx_nbt}")
            self.idx_stages = index_num_stages or (3 if self.idx_nbt * block_size * (self.DI or 0) * ebytes <= 32768
                                                  else 2)
            ntiles = math.ceil(self.nb_cap / self.idx_nbt)
            pps = index_programs_per_sm or 2
            per_seq = max(1, (pps * nsm) // max(1, B * self.idx_row_tiles))
            self.idx_tps = max(1, math.ceil(ntiles / per_seq))
            if index_blocks_per_program is not None:
                self.idx_tps = max(1, math.ceil(int(index_blocks_per_program) / self.idx_nbt))
            self.k_pad = _pow2(topk)
            nrows = B * T * H
            self.fused = bool(fused)
            if self.fused:
                # the range of one program is held in registers (ROWS x blocks): <= 128 blocks; the
                # attention merges splits * C_PAD candidates per row in registers: <= 8192
                self.idx_tps = min(self.idx_tps, max(1, FUSED_MAX_BLOCKS // self.idx_nbt))
                c_pad = min(self.k_pad, _pow2(self.idx_tps) * self.idx_nbt)
                if math.ceil(ntiles / self.idx_tps) * c_pad > FUSED_MAX_CAND:
                    self.idx_tps = math.ceil(ntiles / (FUSED_MAX_CAND // self.k_pad))
                    c_pad = min(self.k_pad, _pow2(self.idx_tps) * self.idx_nbt)
                if _pow2(self.idx_tps) * self.idx_nbt > 2 * FUSED_MAX_BLOCKS:
                    self.fused = False       # beyond the fused chain's bounds: legacy chain
                    self.idx_tps = max(1, math.ceil(ntiles / per_seq))
            self.idx_splits = math.ceil(ntiles / self.idx_tps)
            if self.fused:
                self.idx_nt_pad = _pow2(self.idx_tps)
                self.c_pad = min(self.k_pad, self.idx_nt_pad * self.idx_nbt)
                self.ncand = self.idx_splits * self.c_pad
                self.ncand_pad = _pow2(self.ncand)
                self.scores = None
                self.cand = torch.empty(nrows, self.idx_splits, self.c_pad, dtype=torch.int64, device=dev)
            else:
                # top-k chunks of <= 512 blocks, ~256 candidates per warp (the fastest size timed at 1M)
                self.chunk = max(self.k_pad, min(512, _pow2(self.nb_cap)))
                if topk_chunk is not None:
                    check(topk_chunk >= self.k_pad and topk_chunk & (topk_chunk - 1) == 0,
                          f"topk_chunk must be a power of two >= {self.k_pad}, got {topk_chunk}")
                    self.chunk = topk_chunk
                self.nc = math.ceil(self.nb_cap / self.chunk)
                self.topk_warps = min(16, max(1, self.chunk // 256))   # ~256 candidates per warp
                self.merge_pad = _pow2(self.nc * self.k_pad)
                self.merge_warps = 1 if self.merge_pad <= 512 else (2 if self.merge_pad <= 2048 else 4)
                self.scores = torch.empty(B, T, H, self.nb_cap, dtype=torch.float32, device=dev)
                self.cand = torch.empty(nrows, self.nc, self.k_pad, dtype=torch.int64, device=dev)
            self.block_indices = torch.empty(B, T, H, topk, dtype=torch.int32, device=dev)
        else:
            self.fused = bool(fused)
        # only the legacy chain with several chunks has a top-k merge to fold into the attention
        self.select_in_attention = select_in_attention and not dense and not self.fused and self.nc > 1
        # attention geometry: split the k blocks (or all blocks when dense) so that ~2 programs per SM
        nblocks = self.nb_cap if dense else topk
        progs = max(1, B * T * H)
        want = max(1, math.ceil(2 * nsm / progs))
        self.att_splits = max(1, min(nblocks, want if not dense else max(want, math.ceil(nblocks / 64))))
        if attention_splits is not None:
            self.att_splits = max(1, min(nblocks, int(attention_splits)))
        self.att_bps = math.ceil(nblocks / self.att_splits)
        self.att_splits = math.ceil(nblocks / self.att_bps)
        # one split: the attention writes o / lse itself (no merge launch)
        self.att_direct = self.att_splits == 1
        ns = 0 if self.att_direct else self.att_splits
        self.o_part = torch.empty(B * T, HQ, ns, D, dtype=torch.float32, device=dev)
        self.lse_part = torch.empty(B * T, HQ, ns, dtype=torch.float32, device=dev)
        self.out = torch.empty(B, T, HQ, D, dtype=self.out_dtype, device=dev)
        self.lse = torch.empty(B, T, HQ, dtype=torch.float32, device=dev)
        # the msa.tuning switches are read once, when the plan is built (a plan serves a whole generation)
        tune = tuning.current()
        # programmatic dependent launch (sm_90+, tuning.decode_pdl=False turns it off): each kernel after the
        # first may be scheduled while its predecessor finishes, and waits (griddepcontrol.wait) before
        # reading the predecessor's output; hides part of the per-launch latency inside a CUDA graph
        self.pdl = (tune.decode_pdl and dev.type == "cuda" and not interpreting()
                    and torch.cuda.get_device_capability(dev)[0] >= 9)
        self._pdl_launch = {"launch_pdl": True} if self.pdl else {}
        # fp8 index keys with bf16 queries: score in fp16 (exact key convert, rescaled queries; see
        # decode_index_fwd_kernel); tuning.decode_fp8_f16=False keeps the bf16 path
        self.fp8_f16 = tune.decode_fp8_f16
        # top-k of the candidates by tl.topk's bitonic network (log-depth) instead of topk dependent max
        # reductions; tuning.decode_bitonic=False keeps the reductions
        self.bitonic = tune.decode_bitonic
        self._dummy_i = torch.zeros(1, dtype=torch.int32, device=dev)
        self._dummy_l = torch.zeros(1, dtype=torch.int64, device=dev)
        self._dummy_f = torch.ones(1, dtype=torch.float32, device=dev)

    def check_inputs(self, q: torch.Tensor, q_idx: Optional[torch.Tensor], layer_idx: int) -> None:
        """Shape / dtype / device checks (host metadata only, no sync)."""
        c = self.cache
        check(isinstance(layer_idx, int) and 0 <= layer_idx < c.num_layers,
              f"layer_idx must be in [0, {c.num_layers}), got {layer_idx!r}")
        check(isinstance(q, torch.Tensor) and tuple(q.shape) == (self.B, self.T, self.HQ, self.D),
              f"q must have shape (B, t, H_q, D) = {(self.B, self.T, self.HQ, self.D)}, got "
              f"{tuple(q.shape) if isinstance(q, torch.Tensor) else type(q).__name__}")
        check(q.dtype == c.dtype, f"q must have the cache dtype {c.dtype}, got {q.dtype}")
        check(q.device == c.device, f"q must be on the cache device {c.device}, got {q.device}")
        if not self.dense:
            check(isinstance(q_idx, torch.Tensor) and tuple(q_idx.shape) == (self.B, self.T, self.H, self.DI),
                  f"q_idx must have shape (B, t, H_kv, D_idx) = {(self.B, self.T, self.H, self.DI)}")
            check(q_idx.dtype == c.dtype, f"q_idx must have the cache dtype {c.dtype}, got {q_idx.dtype}")
            check(q_idx.device == c.device, f"q_idx must be on the cache device {c.device}, got {q_idx.device}")

    def run(self, q: torch.Tensor, q_idx: Optional[torch.Tensor], layer_idx: int,
            block_indices: Optional[torch.Tensor] = None, timer=None) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Launch the decode kernels for one layer. Only kernel launches: capturable in a CUDA graph.

        block_indices: optional int32 (B, t, H_kv, topk) selection to use instead of the indexer's
        (index convention of spec section 1); q_idx is then ignored.
        timer: optional callable (benchmarks, never inside a graph): called with a kernel name right
        before each launch and with None after the last one (e.g. to record CUDA events)."""
        c = self.cache
        q = q if q.is_contiguous() else q.contiguous()
        lens = c.lengths_dev[layer_idx]
        pt = c.page_table if c.paged else self._dummy_i
        B, T, H, BS = self.B, self.T, self.H, self.block_size
        sel = None
        if block_indices is not None and not self.dense:
            check(block_indices.dtype == torch.int32 and tuple(block_indices.shape) == (B, T, H, self.topk),
                  f"block_indices must be int32 (B, t, H_kv, topk) = {(B, T, H, self.topk)}")
            sel = block_indices if block_indices.is_contiguous() else block_indices.contiguous()
        elif not self.dense:
            q_idx = q_idx if q_idx.is_contiguous() else q_idx.contiguous()
            kidx = c.k_idx[layer_idx]
            mode = 0 if not c.fp8_index else (1 if c.index_scale_mode == "token" else 2)
            ks = c.k_idx_scale[layer_idx] if mode else self._dummy_f
            di_pad = max(16, _pow2(self.DI))
            if timer is not None:
                timer("index")
            fz = self.fused
            tk.decode_index_fwd_kernel[(B, self.idx_row_tiles, self.idx_splits)](
                q_idx, kidx, ks, pt, lens, self.cand if fz else self.scores,
                T, H, self.DI, self.nb_cap, self.s_rows, self.pt_stride, self.idx_tps, self.idx_splits,
                self.init_blocks, self.local_blocks, self.index_scale,
                BS=BS, NBT=self.idx_nbt, DI_PAD=di_pad, ROWS=self.idx_rows, PAGED=c.paged,
                SCALE_MODE=mode, F32=self.f32, EVEN_D=di_pad == self.DI, LOCAL_TOPK=fz,
                NT_PAD=self.idx_nt_pad if fz else 1, TOPK=self.topk, K_PAD=self.k_pad,
                C_PAD=self.c_pad if fz else 1, PDL=self.pdl, FP8_F16=self.fp8_f16 and bool(mode) and q_idx.dtype == torch.bfloat16,
                num_warps=4, num_stages=self.idx_stages if not interpreting() else 1)
            if not fz:
                nrows = B * T * H
                final = self.nc == 1
                if timer is not None:
                    timer("topk")
                tk.decode_topk_fwd_kernel[(nrows, self.nc)](
                    self.scores, lens, self.cand, self.block_indices,
                    T, H, self.nb_cap, self.nc, self.init_blocks, self.local_blocks,
                    BS=BS, TOPK=self.topk, K_PAD=self.k_pad, CHUNK=self.chunk, FINAL=final, PDL=self.pdl,
                    BITONIC=self.bitonic, num_warps=self.topk_warps, **self._pdl_launch)
                if not final and not self.select_in_attention:
                    if timer is not None:
                        timer("topk_merge")
                    tk.decode_topk_merge_fwd_kernel[(nrows,)](
                        self.cand, lens, self.block_indices, T, H, self.nc,
                        BS=BS, TOPK=self.topk, K_PAD=self.k_pad, NCK_PAD=self.merge_pad, PDL=self.pdl,
                        BITONIC=self.bitonic, num_warps=self.merge_warps, **self._pdl_launch)
            sel = self.block_indices
        G = self.G
        # the attention merges candidates itself: the fused chain's per-range ones, or the top-k chunks'
        fused_sel = (self.fused or self.select_in_attention) and not self.dense and block_indices is None
        if fused_sel:
            ncand, ncand_pad = (self.ncand, self.ncand_pad) if self.fused else (self.nc * self.k_pad, self.merge_pad)
        # the attention follows a kernel of this chain (PDL-safe) unless the selection came from outside
        sel_from_chain = not self.dense and block_indices is None
        d_pad = max(16, _pow2(self.D))
        warps = 4 if G <= 16 else 8
        if fused_sel and ncand_pad > 4096:
            warps = 8                                  # the candidate merge holds ncand_pad int64
        g_pad = max(16, _pow2(G))
        if timer is not None:
            timer("attention")
        tk.decode_attention_fwd_kernel[(B * T, H, self.att_splits)](
            q, c.k[layer_idx], c.v[layer_idx], sel if sel is not None else self._dummy_i,
            self.cand if fused_sel else self._dummy_l, pt, lens,
            self.out if self.att_direct else self.o_part, self.lse if self.att_direct else self.lse_part,
            T, H, G, self.D, self.s_rows, self.pt_stride, self.att_splits, self.att_bps,
            ncand if fused_sel else 1, self.scale * tk.LOG2E,
            BS=BS, G_PAD=g_pad, D_PAD=d_pad, PAGED=c.paged, DENSE=self.dense,
            F32=self.f32, EVEN_D=d_pad == self.D, FUSED_SEL=fused_sel, DIRECT=self.att_direct,
            K_PAD=self.k_pad if fused_sel else 1, NCAND_PAD=ncand_pad if fused_sel else 1, TOPK=self.topk,
            PDL=self.pdl and sel_from_chain, BITONIC=self.bitonic,
            num_warps=warps, num_stages=2 if not interpreting() else 1,
            **(self._pdl_launch if sel_from_chain else {}))
        if not self.att_direct:
            if timer is not None:
                timer("attn_merge")
            tk.decode_merge_fwd_kernel[(B * T * self.HQ,)](
                self.o_part, self.lse_part, self.out, self.lse, self.D, self.att_splits,
                S_PAD=_pow2(self.att_splits), D_PAD=d_pad, PDL=self.pdl, num_warps=4, **self._pdl_launch)
        if timer is not None:
            timer(None)
        return self.out, sel


PLAN_MEMO_SIZE = 8  # plans kept per cache (distinct step shapes, e.g. chunk sizes of a chunked prefill)


def get_decode_plan(cache, *, num_heads: int, num_tokens: int, block_size: int, topk: int, init_blocks: int,
                    local_blocks: int, scale: float, index_scale: float, dense: bool,
                    out_dtype: Optional[torch.dtype] = None) -> DecodePlan:
    """The DecodePlan of these arguments for ``cache``, built on first use and memoised in ``cache.plans``
    (the oldest of more than PLAN_MEMO_SIZE is dropped), so a generation builds each plan once. A memoised
    plan's outputs are overwritten by its next run. Arguments as in DecodePlan (not re-validated here)."""
    out_dtype = cache.dtype if out_dtype is None else out_dtype
    key = ("triton", num_heads, num_tokens, block_size, topk, init_blocks, local_blocks, float(scale),
           float(index_scale), bool(dense), out_dtype)
    plan = cache.plans.get(key)
    if plan is None:
        plan = DecodePlan(cache, num_heads=num_heads, block_size=block_size, topk=topk, init_blocks=init_blocks,
                          local_blocks=local_blocks, num_tokens=num_tokens, scale=scale, index_scale=index_scale,
                          dense=dense, out_dtype=out_dtype)
        while len(cache.plans) >= PLAN_MEMO_SIZE:
            cache.plans.pop(next(iter(cache.plans)))
        cache.plans[key] = plan
    return plan


def decode_attention_triton(q: torch.Tensor, q_idx: Optional[torch.Tensor], cache, layer_idx: int, *,
                            block_size: int, topk: int, init_blocks: int, local_blocks: int, scale: float,
                            index_scale: float, dense: bool) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Decode through the cache's memoised plan (arguments already validated; q in the cache dtype).
    Returns o (B, t, H_q, D) and the selection int32 (B, t, H_kv, topk) (None when dense): the plan's
    buffers, valid until the plan's next run."""
    plan = get_decode_plan(cache, num_heads=q.shape[2], block_size=block_size, topk=topk, init_blocks=init_blocks,
                           local_blocks=local_blocks, num_tokens=q.shape[1], scale=scale, index_scale=index_scale,
                           dense=dense, out_dtype=q.dtype)
    return plan.run(q, None if dense else q_idx, layer_idx)
