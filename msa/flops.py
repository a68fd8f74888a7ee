"""Cost model of spec section 3: per-layer causal attention FLOPs and decode bytes (no projections)."""

from __future__ import annotations

from typing import Dict, List


def dense_flops(seqlen: int, num_heads: int = 64, head_dim: int = 128) -> float:
    """Dense causal GQA attention FLOPs of one layer for a T-token prefill: 2 * H_q * d * T^2."""
    return 2.0 * num_heads * head_dim * seqlen ** 2


def msa_index_flops(seqlen: int, num_kv_heads: int = 4, index_dim: int = 128) -> float:
    """Index branch FLOPs of one layer (causal): H_kv * d_idx * T^2."""
    return float(num_kv_heads) * index_dim * seqlen ** 2


def msa_attention_flops(seqlen: int, num_heads: int = 64, head_dim: int = 128, topk: int = 16,
                        block_size: int = 128) -> float:
    """Sparse main-branch FLOPs of one layer: 4 * H_q * d * T * k * B_k."""
    return 4.0 * num_heads * head_dim * seqlen * topk * block_size


def msa_flops(seqlen: int, num_heads: int = 64, num_kv_heads: int = 4, head_dim: int = 128, index_dim: int = 128,
              topk: int = 16, block_size: int = 128) -> float:
    """F_msa = H_kv * d_idx * T^2 + 4 * H_q * d * T * k * B_k (spec Eq. 12)."""
    return msa_index_flops(seqlen, num_kv_heads, index_dim) + msa_attention_flops(seqlen, num_heads, head_dim,
                                                                                  topk, block_size)


def dense_decode_bytes(context: int, num_kv_heads: int = 4, head_dim: int = 128, bytes_per_elem: int = 2) -> float:
    """Cache bytes one decoded token reads in one layer with dense attention: 2 * H_kv * d * T elements."""
    return 2.0 * num_kv_heads * head_dim * context * bytes_per_elem


def msa_decode_bytes(context: int, num_kv_heads: int = 4, head_dim: int = 128, index_dim: int = 128,
                     topk: int = 16, block_size: int = 128, bytes_per_elem: int = 2,
                     index_bytes_per_elem: float = 2) -> float:
    """MSA decode bytes per token per layer: index keys d_idx * T plus selected K/V 2*H_kv*d*k*B_k."""
    selected = min(context, topk * block_size)
    return index_dim * context * index_bytes_per_elem + 2.0 * num_kv_heads * head_dim * selected * bytes_per_elem


def table(seqlens: List[int], **shape) -> List[Dict[str, float]]:
    """Rows with T, dense and MSA FLOPs per token, their ratio, and decode bytes per token (bf16, fp8 index)."""
    rows = []
    keys_f = ("num_heads", "num_kv_heads", "head_dim", "index_dim", "topk", "block_size")
    fs = {k: v for k, v in shape.items() if k in keys_f}
    for t in seqlens:
        d = dense_flops(t, fs.get("num_heads", 64), fs.get("head_dim", 128))
        m = msa_flops(t, **fs)
        bd = dense_decode_bytes(t, fs.get("num_kv_heads", 4), fs.get("head_dim", 128))
        dec = {k: v for k, v in fs.items() if k != "num_heads"}
        bm = msa_decode_bytes(t, **dec)
        bm8 = msa_decode_bytes(t, index_bytes_per_elem=1, **dec)
        rows.append({"tokens": t, "dense_flops_per_token": d / t, "msa_flops_per_token": m / t, "flops_ratio": d / m,
                     "dense_decode_bytes": bd, "msa_decode_bytes": bm, "decode_ratio": bd / bm,
                     "msa_decode_bytes_fp8_index": bm8, "decode_ratio_fp8_index": bd / bm8})
    return rows
