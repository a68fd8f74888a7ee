"""Ahead-of-time resource check of the Triton kernels at the paper's shape, no GPU needed.

    pip install --no-deps --target /tmp/t36 triton-3.6.0-cp311-*.whl     # the GPU's Triton (has ptxas)
    PYTHONPATH=/tmp/t36:. python -m msa.bench.aot_check [--arch 90] [--json OUT.json] [--only SUBSTR]

(do NOT set TRITON_INTERPRET). For each kernel launch that a training step makes at H_q 64, H_kv 4,
D 128, d_idx 128, block 128, k 16, bf16 (the launchers' own config functions are called, so the
``msa.tuning`` launch overrides (e.g. MSA_TUNING="sparse_bwd_config=...") apply), and for the decode chain at 1M tokens, batch 1 (bf16 and fp8 index keys), it compiles for
sm_<arch> with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`` and prints the
static shared memory (``metadata.shared``, what the launcher checks against the device's
232448-byte opt-in limit on H100/H200), registers / spill stores / spill loads from ``ptxas -v`` on
the generated PTX, and how many Hopper ``wgmma`` vs warp-level ``mma.sync`` instructions the PTX
holds. Exit status 1 if any kernel needs more shared memory than --limit (default 232448) or fails
to compile. Pointer arguments are assumed 16-byte aligned and integer arguments divisible by 16 get
the divisibility hint, as the JIT does at run time.

Also runnable on a GPU machine (it never launches anything).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("aot_check.py compiles real kernels: unset TRITON_INTERPRET")

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402


HQ, HKV, D, DI, BLOCK, TOPK = 64, 4, 128, 128, 128, 16
T = 32768
SMEM_LIMIT = 232448  # H100/H200 opt-in shared memory per block


def _pow2(x, lo=16):
    return max(lo, triton.next_power_of_2(int(x)))


def _launches():
    """[(label, kernel fn, {arg: value or type}, {constexpr: value}, num_warps, num_stages)] of one
    training step at the paper's shape, built from the launchers' config functions."""
    from msa.ops.indexer_kl import triton_kernels as kk
    from msa.ops.indexer_kl.triton_impl import _dense_tiles, dense_flash_config, kv_config
    from msa.ops.sparse_attention import triton_bwd as bw
    from msa.ops.sparse_attention import triton_fwd as fw
    from msa.ops.sparse_attention import triton_impl as fi
    from msa.ops.sparse_attention.triton_impl import kv_outer_config, qo_config

    g = HQ // HKV
    bf, f32, i32 = "*bf16", "*fp32", "*i32"
    cdt, prec = tl.bfloat16, "tf32"
    bs_pad, bd, bdi = _pow2(BLOCK), _pow2(D), _pow2(DI)
    out = []

    # sparse attention forward (KV-outer kernel + combine), owned by the forward's engineer
    fc = kv_outer_config(D, g, BLOCK)
    kv_tiles = -(-BLOCK // fc["BLOCK_N"])
    out.append(("sparse_attention_fwd_kernel", fw.sparse_attention_fwd_kernel,
                dict(Q=bf, K=bf, V=bf, PO=bf, PLSE=f32, ENTRIES=i32, WORK_ROW=i32, WORK_START=i32, WORK_END=i32,
                     WORK_ORDER=i32, BLOCK_START=i32, BLOCK_LEN=i32, tok0=0, nb_rows=T // BLOCK, qk_scale=0.1),
                dict(H_Q=HQ, H_KV=HKV, G=g, TOPK=TOPK, D=D, BLOCK_D=bd, BLOCK_M=fc["BLOCK_M"], BLOCK_N=fc["BLOCK_N"],
                     KV_TILES=kv_tiles, PRELOAD=bool(fc["PRELOAD"]) and kv_tiles == 1, UPCAST=False, DOT_PREC=prec,
                     PREFETCH=fc["PREFETCH"]), fc["num_warps"], fc["num_stages"]))
    # the forward is another engineer's and evolves: take its combine config when it has one
    if hasattr(fi, "combine_config"):
        cc = fi.combine_config(D, TOPK, HQ)
        cc_const = dict(BLOCK_H=cc["BLOCK_H"], TOK_PER_PROG=cc["TOK_PER_PROG"])
        cc_warps = cc.get("num_warps", 4)
    else:
        cc_const, cc_warps = dict(BLOCK_H=min(_pow2(HQ, 1), max(1, 4096 // bd))), 4
    cc_args = dict(PO=bf, PLSE=f32, BI=i32, O=bf, LSE=f32, tok0=0, n_tok=T)
    cc_args = {a: v for a, v in cc_args.items() if a in fw.sparse_attention_combine_fwd_kernel.arg_names}
    out.append(("sparse_attention_combine_fwd_kernel", fw.sparse_attention_combine_fwd_kernel, cc_args,
                dict(H_Q=HQ, H_KV=HKV, G=g, TOPK=TOPK, BLOCK_K=_pow2(TOPK, 1), D=D, BLOCK_D=bd, **cc_const),
                cc_warps, 3))
    qc = qo_config(D, g, BLOCK)
    out.append(("sparse_attention_qo_fwd_kernel (short sequences only)", fw.sparse_attention_qo_fwd_kernel,
                dict(Q=bf, K=bf, V=bf, O=bf, LSE=f32, BI=i32, SEQ_BLOCK_OFFSET=i32, BLOCK_START=i32, BLOCK_LEN=i32,
                     qk_scale=0.1),
                dict(H_Q=HQ, H_KV=HKV, G=g, TOPK=TOPK, D=D, BLOCK_D=bd, BLOCK_G=_pow2(g), BLOCK_N=qc["BLOCK_N"],
                     KV_TILES=-(-BLOCK // qc["BLOCK_N"]), UPCAST=False, DOT_PREC=prec),
                qc["num_warps"], qc["num_stages"]))

    # the query-tiled forward (auto below 32K tokens), union of 8-token tiles: at most 8 * topk entries
    from msa.ops.utils.tile_union import tile_tokens_for
    tc = fi.tiled_config(D, g, BLOCK)
    tt = fi.tiled_tile_tokens(D, g, BLOCK)
    subs = -(-BLOCK // tt)
    tiled_args = dict(UIDS=i32, UBITS=i32, UCOUNT=i32, PERM=i32, SEQ_BLOCK_OFFSET="*i64", BLOCK_START=i32,
                      BLOCK_LEN=i32, block_size=BLOCK)
    out.append(("sparse_attention_tiled_fwd_kernel (auto below 32K)", fw.sparse_attention_tiled_fwd_kernel,
                dict(Q=bf, K=bf, V=bf, O=bf, LSE=f32, qk_scale=0.1, **tiled_args),
                dict(H_Q=HQ, H_KV=HKV, G=g, UMAX=tt * TOPK, TILE_T=tt, SUBS=subs, D=D, BLOCK_D=bd,
                     BLOCK_M=_pow2(tt * g), BLOCK_N=tc["BLOCK_N"], KV_TILES=-(-BLOCK // tc["BLOCK_N"]), UPCAST=False,
                     DOT_PREC=prec, EVEN_N=BLOCK % tc["BLOCK_N"] == 0), tc["num_warps"], tc["num_stages"]))

    # sparse attention backward
    bc = bw.bwd_config(g, D, BLOCK, large_smem=True)  # sm_90
    ttq = tile_tokens_for(g, bc["DQT_BLOCK_M"], BLOCK)
    out.append(("sparse_attention_bwd_dq_tiled_kernel (dQ mode tiled, auto below 32K)",
                bw.sparse_attention_bwd_dq_tiled_kernel,
                dict(Q=bf, K=bf, V=bf, DO=bf, LSE=f32, DELTA=f32, DQ=bf, qk_scale=0.1, scale=0.1, **tiled_args),
                dict(H_Q=HQ, H_KV=HKV, G=g, UMAX=ttq * TOPK, TILE_T=ttq, SUBS=-(-BLOCK // ttq), D=D, BLOCK_D=bd,
                     BLOCK_M=_pow2(ttq * g), BLOCK_N=bc["DQT_BLOCK_N"], KV_TILES=-(-BLOCK // bc["DQT_BLOCK_N"]),
                     CDT=cdt, DOT_PREC=prec), bc["DQT_WARPS"], bc["DQT_STAGES"]))
    out.append(("sparse_attention_bwd_preprocess_kernel", bw.sparse_attention_bwd_preprocess_kernel,
                dict(O=bf, DO=bf, DELTA=f32, n_rows=T * HQ), dict(D=D, BLOCK_R=64, BLOCK_D=bd), 4, 3))
    out.append(("sparse_attention_bwd_dq_kernel", bw.sparse_attention_bwd_dq_kernel,
                dict(Q=bf, K=bf, V=bf, DO=bf, LSE=f32, DELTA=f32, DQ=bf, BI=i32, SEQ_START=i32, scale=0.1, HQ=HQ,
                     HKV=HKV, NSEL=TOPK, BS=BLOCK),
                dict(G=g, D=D, BLOCK_G=_pow2(g), BLOCK_N=bc["DQ_BLOCK_N"], KV_TILES=bs_pad // bc["DQ_BLOCK_N"],
                     BLOCK_D=bd, CDT=cdt, DOT_PREC=prec), bc["DQ_WARPS"], bc["DQ_STAGES"]))
    out.append(("sparse_attention_bwd_dkdv_kernel", bw.sparse_attention_bwd_dkdv_kernel,
                dict(Q=bf, K=bf, V=bf, DO=bf, LSE=f32, DELTA=f32, DK=bf, DV=bf, PDK=f32, PDV=f32,
                     ENTRIES=i32, WORK_ROW=i32, WORK_START=i32, WORK_END=i32, WORK_ORDER=i32, WORK_SLOT=i32, BLOCK_START=i32,
                     BLOCK_LEN=i32, scale=0.1, HQ=HQ, HKV=HKV, NSEL=TOPK, NB=T // BLOCK),
                dict(G=g, D=D, BLOCK_M=bc["DKDV_BLOCK_M"], BLOCK_N=bc["DKDV_BLOCK_N"], BLOCK_D=bd, BS_PAD=bs_pad,
                     CDT=cdt, DOT_PREC=prec), bc["DKDV_WARPS"], bc["DKDV_STAGES"]))
    out.append(("sparse_attention_bwd_dq_kv_kernel (dQ mode kv, default)", bw.sparse_attention_bwd_dq_kv_kernel,
                dict(Q=bf, K=bf, V=bf, DO=bf, LSE=f32, DELTA=f32, PDQ=bf, ENTRIES=i32, WORK_ROW=i32,
                     WORK_START=i32, WORK_END=i32, WORK_ORDER=i32, BLOCK_START=i32, BLOCK_LEN=i32, tok0=0, nb_rows=T // BLOCK,
                     qk_scale=0.1, scale=0.1),
                dict(H_Q=HQ, H_KV=HKV, G=g, TOPK=TOPK, D=D, BLOCK_D=bd, BLOCK_M=bc["DQKV_BLOCK_M"],
                     BLOCK_N=bc["DQKV_BLOCK_N"], KV_TILES=-(-BLOCK // bc["DQKV_BLOCK_N"]), CDT=cdt, DOT_PREC=prec),
                bc["DQKV_WARPS"], bc["DQKV_STAGES"]))
    bk = _pow2(TOPK, 1)
    out.append(("sparse_attention_bwd_dq_reduce_kernel", bw.sparse_attention_bwd_dq_reduce_kernel,
                dict(PDQ=bf, BI=i32, DQ=bf, tok0=0),
                dict(H_Q=HQ, H_KV=HKV, G=g, TOPK=TOPK, BLOCK_K=bk, D=D, BLOCK_D=bd,
                     BLOCK_H=bc["DQR_BLOCK_H"] or min(_pow2(HQ, 1), max(1, 16384 // (bk * bd)))), 4, 3))
    out.append(("sparse_attention_bwd_reduce_kernel", bw.sparse_attention_bwd_reduce_kernel,
                dict(PDK=f32, PDV=f32, DK=bf, DV=bf, ROW_ITEMS=i32, ROW_FIRST_SLOT=i32, BLOCK_START=i32,
                     BLOCK_LEN=i32, HKV=HKV, NB=T // BLOCK),
                dict(D=D, BLOCK_N=bc["DKDV_BLOCK_N"], BLOCK_D=bd, BS_PAD=bs_pad), 4, 3))

    # indexer KL, sparse phase
    kc = kv_config(D, DI, g, T, large_smem=True)
    out.append(("indexer_kl_fwd_slse_kv_kernel", kk.indexer_kl_fwd_slse_kv_kernel,
                dict(QI=bf, KI=bf, PLSE=f32, ENTRIES=i32, WORK_ROW=i32, WORK_START=i32, WORK_END=i32,
                     WORK_ORDER=i32, BLOCK_START=i32, BLOCK_LEN=i32, tok0=0, index_scale=0.1, HKV=HKV, NSEL=TOPK, NB=T // BLOCK),
                dict(DI=DI, BLOCK_E=64, BLOCK_N=bs_pad, BLOCK_DI=bdi, CDT=cdt, DOT_PREC=prec), 4, 3))
    out.append(("indexer_kl_fwd_kv_heads_kernel (sparse KL)", kk.indexer_kl_fwd_kv_heads_kernel,
                dict(QI=bf, KI=bf, Q=bf, K=bf, LSE_T=f32, LSE_S=f32, KLP=f32, DQP=f32, PART=f32, ENTRIES=i32,
                     WORK_ROW=i32, WORK_START=i32, WORK_END=i32, WORK_ORDER=i32, BLOCK_START=i32, BLOCK_LEN=i32,
                     tok0=0, qk2=0.1, is2=0.1, HQ=HQ, HKV=HKV, NSEL=TOPK, NB=T // BLOCK),
                dict(G=g, D=D, DI=DI, BLOCK_E=kc["BLOCK_E"], BS_PAD=bs_pad, BLOCK_D=bd, BLOCK_DI=bdi, CDT=cdt,
                     DOT_PREC=prec, WITH_GRAD=True), kc["num_warps"], kc["num_stages"]))
    out.append(("indexer_kl_bwd_sparse_reduce_kernel", kk.indexer_kl_bwd_sparse_reduce_kernel,
                dict(PART=f32, DKI=f32, ROW_ITEMS=i32, ROW_FIRST=i32, BLOCK_START=i32, BLOCK_LEN=i32, mult=0.1,
                     HKV=HKV, NB=T // BLOCK),
                dict(DI=DI, BLOCK_N=bs_pad, BLOCK_DI=bdi), 4, 3))
    out.append(("indexer_kl_fwd_lse_sparse_kernel (only without teacher_lse)", kk.indexer_kl_fwd_lse_sparse_kernel,
                dict(Q=bf, K=bf, BI=i32, SEQ_START=i32, LSE=f32, scale=0.1, HQ=HQ, HKV=HKV, NSEL=TOPK, BS=BLOCK),
                dict(G=g, D=D, BLOCK_G=_pow2(g), BLOCK_N=bs_pad, BLOCK_D=bd, CDT=cdt, DOT_PREC=prec), 4, 3))

    # indexer KL, warmup phase
    bq, bn, nw = _dense_tiles(D, D)
    out.append(("indexer_kl_fwd_lse_dense_kernel (teacher lse, only without teacher_lse)",
                kk.indexer_kl_fwd_lse_dense_kernel,
                dict(Q=bf, K=bf, SEQ_START=i32, LSE=f32, scale=0.1, NTOK=T, HQ=HQ, HKV=HKV),
                dict(G=g, D=D, BLOCK_Q=bq, BLOCK_N=bn, BLOCK_D=bd, CDT=cdt, DOT_PREC=prec), nw, 3))
    for atomic in (True, False):
        fc2 = dense_flash_config(g, D, DI, atomic)
        out.append((f"indexer_kl_fwd_dense_flash_kernel (warmup, {'flash-atomic' if atomic else 'flash pass 1'})",
                    kk.indexer_kl_fwd_dense_flash_kernel,
                    dict(QI=bf, KI=bf, Q=bf, K=bf, SEQ_START=i32, LSE_T=f32, KL=f32, LSE_S=f32, DQI=f32, DKI=f32,
                         qk2=0.1, is2=0.1, lg2g=4.0, dq_mult=0.1, NTOK=T, HQ=HQ, HKV=HKV),
                    dict(G=g, D=D, DI=DI, BLOCK_M=fc2["BLOCK_M"], BLOCK_N=fc2["BLOCK_N"], BLOCK_D=bd, BLOCK_DI=bdi,
                         CDT=cdt, DOT_PREC=prec, DK_ATOMIC=atomic, FAST=True, TMA=bool(fc2["TMA"]),
                         PF=bool(fc2["PF"]), PF_LINES=D // 64, PF_LINE=64),
                    fc2["num_warps"], fc2["num_stages"]))
    out.append(("indexer_kl_bwd_dense_flash_dk_kernel (warmup flash, pass 2)",
                kk.indexer_kl_bwd_dense_flash_dk_kernel,
                dict(QI=bf, KI=bf, Q=bf, K=bf, SEQ_END=i32, LSE_T=f32, LSE_S=f32, PART=f32, qk2=0.1, is2=0.1, NTOK=T,
                     HQ=HQ, HKV=HKV),
                dict(G=g, D=D, DI=DI, BLOCK_M=fc2["DK_BLOCK_M"], BLOCK_N=fc2["DK_BLOCK_N"], BLOCK_D=bd, BLOCK_DI=bdi,
                     CDT=cdt, DOT_PREC=prec), fc2["DK_WARPS"], fc2["DK_STAGES"]))
    out += _block_max_launches()
    out += _decode_launches()
    return out


def _block_max_launches():
    """The block-max KL's three kernels (``phase.kl_target="block_max"``), bf16, at the paper's shape and
    at the quality study's (H_q 8, H_kv 2, D 64)."""
    from msa.ops.block_max_kl import triton_impl as bi
    from msa.ops.block_max_kl import triton_kernels as bk
    bf, f32, i32 = "*bf16", "*fp32", "*i32"
    out = []
    for label, hq, hkv, d in (("paper shape", HQ, HKV, D), ("quality shape", 8, 2, 64)):
        g = hq // hkv
        bn = min(_pow2(BLOCK), bi.MAX_BLOCK_N)
        out.append((f"block_max_kl_teacher_lse_kernel ({label})", bk.block_max_kl_teacher_lse_kernel,
                    dict(Q=bf, K=bf, POS=i32, L=f32, seq_start=0, seq_len=T, qk_scale=0.1, HQ=hq, HKV=hkv, NB=T // BLOCK),
                    dict(G=g, D=d, ROWS=bi.ROWS, BS=BLOCK, BLOCK_N=bn, BLOCK_D=_pow2(d), BLOCK_G=_pow2(g, 1),
                         CDT=tl.bfloat16, DOT_PREC="tf32"), 4, 3))
        out.append((f"block_max_kl_student_max_kernel ({label})", bk.block_max_kl_student_max_kernel,
                    dict(QI=bf, KI=bf, POS=i32, M=f32, ARG=i32, seq_start=0, seq_len=T, index_scale=0.1, HKV=hkv,
                         NB=T // BLOCK),
                    dict(DI=DI, ROWS=bi.ROWS, BS=BLOCK, BLOCK_N=bn, BLOCK_D=_pow2(DI), CDT=tl.bfloat16,
                         DOT_PREC="tf32"), 4, 3))
        out.append((f"block_max_kl_index_grad_kernel ({label})", bk.block_max_kl_index_grad_kernel,
                    dict(QI=bf, KI=bf, POS=i32, DM=f32, ARG=i32, DQ=f32, DK=f32, seq_start=0, HKV=hkv, NB=T // BLOCK),
                    dict(DI=DI, ROWS=bi.ROWS, BS=BLOCK, BLOCK_D=_pow2(DI)), 4, 3))
    return out


def _decode_launches():
    """Decode kernels at 1M tokens, batch 1, one query token, paper shape (legacy chain, as DecodePlan
    picks at 1M), bf16 and fp8 (per-block scales) index keys, PDL on."""
    from msa.ops.decode import triton_kernels as dk
    bf, f32, i32, i64, f8 = "*bf16", "*fp32", "*i32", "*i64", "*fp8e4nv"
    nb_cap = (1 << 20) // BLOCK
    out = []
    for name, kptr, mode, nbt, tps in (("bf16", bf, 0, 1, 32), ("fp8 per-block", f8, 2, 2, 16)):
        out.append((f"decode_index_fwd_kernel ({name} index keys, 1M, batch 1)", dk.decode_index_fwd_kernel,
                    dict(q_ptr=bf, k_ptr=kptr, ks_ptr=f32, pt_ptr=i32, lens_ptr=i32, out_ptr=f32, T=1, H=HKV, DI=DI,
                         NB_CAP=nb_cap, S_ROWS=1 << 20, PT_STRIDE=0, TPS=tps, NSPLIT=256, INIT=0, LOCALB=1,
                         scale=0.1),
                    dict(BS=BLOCK, NBT=nbt, DI_PAD=DI, ROWS=16, PAGED=False, SCALE_MODE=mode, F32=False, EVEN_D=True,
                         LOCAL_TOPK=False, NT_PAD=1, TOPK=TOPK, K_PAD=TOPK, C_PAD=1, PDL=True,
                         FP8_F16=mode != 0), 4, 3))
    out.append(("decode_topk_fwd_kernel (1M, 512-block chunks)", dk.decode_topk_fwd_kernel,
                dict(score_ptr=f32, lens_ptr=i32, cand_ptr=i64, out_ptr=i32, T=1, H=HKV, NB_CAP=nb_cap, NC=16, INIT=0,
                     LOCALB=1),
                dict(BS=BLOCK, TOPK=TOPK, K_PAD=TOPK, CHUNK=512, FINAL=False, PDL=True, BITONIC=True), 2, 3))
    out.append(("decode_topk_merge_fwd_kernel", dk.decode_topk_merge_fwd_kernel,
                dict(cand_ptr=i64, lens_ptr=i32, out_ptr=i32, T=1, H=HKV, NC=16),
                dict(BS=BLOCK, TOPK=TOPK, K_PAD=TOPK, NCK_PAD=256, PDL=True, BITONIC=True), 1, 3))
    att = dict(q_ptr=bf, k_ptr=bf, v_ptr=bf, idx_ptr=i32, cand_ptr=i64, pt_ptr=i32, lens_ptr=i32, o_ptr=f32,
               lse_ptr=f32, T=1, H=HKV, G=HQ // HKV, D=D, S_ROWS=1 << 20,
               PT_STRIDE=0, NSPLIT=16, BPS=1, NCAND=1, scale_log2=0.1)
    att_c = dict(BS=BLOCK, G_PAD=HQ // HKV, D_PAD=D, PAGED=False, DENSE=False, F32=False, EVEN_D=True,
                 FUSED_SEL=False, DIRECT=False, K_PAD=1, NCAND_PAD=1, TOPK=TOPK, PDL=True, BITONIC=True)
    out.append(("decode_attention_fwd_kernel (16 splits)", dk.decode_attention_fwd_kernel, att, att_c, 4, 2))
    # DecodePlan(select_in_attention=True): merges the 16 chunks' candidates itself (4 launches)
    out.append(("decode_attention_fwd_kernel (16 splits, selects)", dk.decode_attention_fwd_kernel,
                dict(att, NCAND=16 * TOPK), dict(att_c, FUSED_SEL=True, K_PAD=TOPK, NCAND_PAD=16 * TOPK), 4, 2))
    out.append(("decode_merge_fwd_kernel", dk.decode_merge_fwd_kernel,
                dict(o_part_ptr=f32, lse_part_ptr=f32, o_ptr=bf, lse_ptr=f32, D=D, NSPLIT=16),
                dict(S_PAD=16, D_PAD=D, PDL=True), 4, 3))
    return out


def _signature(fn, args, constexprs):
    sig, consts, attrs = {}, dict(constexprs), {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            sig[name] = "constexpr"
            continue
        if name not in args:
            raise KeyError(f"{fn.__name__}: no value for argument {name}")
        v = args[name]
        if isinstance(v, str):  # pointer, 16-byte aligned
            sig[name] = v
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, float):
            sig[name] = "fp32"
        elif v == 1:  # the JIT specialises integer 1 into a constant
            sig[name] = "constexpr"
            consts[name] = 1
        else:
            sig[name] = "i32" if abs(v) < 2 ** 31 else "i64"
            if v % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, consts, attrs


def _ptxas_usage(ptx: str, arch: int):
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if not os.path.exists(ptxas):
        return {}
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        res = subprocess.run([ptxas, "-v", f"-arch=sm_{arch}a", src, "-o", os.path.join(tmp, "k.cubin")],
                             capture_output=True, text=True)
    txt = res.stdout + res.stderr
    out = {}
    m = re.search(r"Used (\d+) registers", txt)
    if m:
        out["regs"] = int(m.group(1))
    m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", txt)
    if m:
        out["spill_st"], out["spill_ld"] = int(m.group(1)), int(m.group(2))
    m = re.search(r"(\d+) bytes stack frame", txt)
    if m:
        out["stack"] = int(m.group(1))
    return out


def check(arch=90, only=None, limit=SMEM_LIMIT, verbose=True):
    rows = []
    for label, fn, args, constexprs, nw, ns in _launches():
        if only and only not in label:
            continue
        row = dict(kernel=label, num_warps=nw, num_stages=ns,
                   constexprs={k: (str(v) if not isinstance(v, (int, float, bool)) else v)
                               for k, v in constexprs.items()})
        try:
            sig, consts, attrs = _signature(fn, args, constexprs)
            src = triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
            ck = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": nw, "num_stages": ns})
            row["shared"] = int(ck.metadata.shared)
            row.update(_ptxas_usage(ck.asm["ptx"], arch))
            # which MMA the kernel got: Hopper wgmma, or the older warp-level mma.sync (small tiles)
            row["wgmma"] = ck.asm["ptx"].count("wgmma.mma_async")
            row["mma_sync"] = ck.asm["ptx"].count("mma.sync")
            row["ok"] = row["shared"] <= limit
        except Exception as exc:  # a compile failure is a failure too
            row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
            row["ok"] = False
        rows.append(row)
        if verbose:
            print(_fmt(row), flush=True)
    return rows


def _fmt(r):
    if "error" in r:
        return f"{r['kernel'][:62]:62s} w{r['num_warps']} s{r['num_stages']}  ERROR {r['error'][:200]}"
    return (f"{r['kernel'][:62]:62s} w{r['num_warps']} s{r['num_stages']}  shared {r['shared']:7d}  "
            f"regs {r.get('regs', '?'):>3}  spill st/ld {r.get('spill_st', '?')}/{r.get('spill_ld', '?')}"
            f"  wgmma/mma.sync {r.get('wgmma', '?')}/{r.get('mma_sync', '?')}{'' if r['ok'] else '  OVER LIMIT'}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--limit", type=int, default=SMEM_LIMIT)
    ap.add_argument("--only", default=None, help="substring of the kernel labels to check")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    print(f"triton {triton.__version__}, sm_{args.arch}, shape H_q {HQ} H_kv {HKV} D {D} d_idx {DI} "
          f"block {BLOCK} k {TOPK} bf16; shared-memory limit {args.limit}", flush=True)
    rows = check(args.arch, args.only, args.limit)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(triton=triton.__version__, arch=args.arch, limit=args.limit, rows=rows), f, indent=1)
    bad = [r["kernel"] for r in rows if not r["ok"]]
    print("AOT check:", "PASS" if not bad else f"FAIL ({', '.join(bad)})")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
