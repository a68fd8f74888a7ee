"""fp8 index-key codec: error bound, scale placement, zero keys, per-block scales."""

import torch

from msa.cache import FP8_MAX, dequantize_fp8, quantize_fp8


def test_per_token_roundtrip_error_and_scale():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 32, generator=g) * torch.logspace(-3, 3, 50)[:, None]
    qv, s = quantize_fp8(x)
    assert qv.dtype == torch.float8_e4m3fn and s.shape == (50,) and s.dtype == torch.float32
    # the largest entry of every token maps to +-448 exactly
    torch.testing.assert_close(qv.float().abs().amax(-1), torch.full((50,), FP8_MAX))
    back = dequantize_fp8(qv, s)
    amax = x.abs().amax(-1, keepdim=True)
    assert ((back - x).abs() <= amax / 16 + 1e-12).all()  # 3 mantissa bits: half an ulp <= 2^-4 relative


def test_zero_key_and_per_block_scale():
    x = torch.zeros(3, 8)
    qv, s = quantize_fp8(x)
    assert torch.equal(dequantize_fp8(qv, s), x) and bool((s > 0).all())
    g = torch.Generator().manual_seed(1)
    xb = torch.randn(4, 16, 8, generator=g)  # 4 blocks of 16 tokens
    qb, sb = quantize_fp8(xb, dim_block=True)
    assert sb.shape == (4,)
    torch.testing.assert_close(sb, xb.abs().amax(dim=(-1, -2)) / FP8_MAX)
    back = dequantize_fp8(qb.view(64, 8), sb.repeat_interleave(16))
    assert ((back - xb.view(64, 8)).abs() <= sb.repeat_interleave(16)[:, None] * FP8_MAX / 16).all()


def test_prefill_key_blocks_share_one_scale_per_block_of_each_sequence():
    # packed pieces of 5 and 7 tokens in blocks of 4: blocks [0:4] [4:5] | [5:9] [9:12]; every token
    # carries its block's scale amax / 448, blocks never straddle a sequence start, and the round trip
    # error of an entry is at most 2^-4 of its block's amax
    from msa.cache import quantize_fp8_key_blocks
    g = torch.Generator().manual_seed(3)
    k = torch.randn(12, 8, generator=g) * torch.tensor([1, 1, 1, 9, 2, 1, 1, 1, 1, 5, 5, 5.0]).view(12, 1)
    vals, s = quantize_fp8_key_blocks(k, [0, 5, 12], 4)
    assert vals.dtype == torch.float8_e4m3fn and s.shape == (12,)
    for a, b in ((0, 4), (4, 5), (5, 9), (9, 12)):
        amax = k[a:b].abs().max()
        assert torch.allclose(s[a:b], (amax / FP8_MAX).expand(b - a))
        err = (vals[a:b].float() * s[a:b, None] - k[a:b]).abs().max()
        assert float(err) <= float(amax) * 2 ** -4
    assert s[3] != s[4] and s[4] != s[5]  # a new block at 4 (same sequence) and at the sequence start 5
