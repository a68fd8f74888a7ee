"""Triton block-max KL (``msa.block_max_kl_loss``) vs autograd of the PyTorch reference (CPU:
TRITON_INTERPRET=1), on the same sampled rows.

Tolerances: fp32 inputs, loss |ours - ref| <= 1e-5 * max(1, |ref|), index gradients relative error
||x - ref|| / max(||ref||, 1e-6) < 1e-4 (the gradient of a block max reaches one key in both; random
inputs have no ties); on a GPU 1e-4 / 5e-4 (exp2 and summation order differ). bf16 inputs (GPU only):
loss within 2e-3 relative, gradients within 2e-2 (argmax flips between near-equal keys move whole
gradient rows). Covers odd lengths, a short last block, packed sequences, B = 2, G in {1, 2, 3, 4},
blocks wider than one key tile, sampled and all rows, the teacher built in row chunks, and the detach rule.
"""

import os

if os.environ.get("TRITON_INTERPRET") is None:
    import torch as _t
    if not _t.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"

import pytest
import torch

from msa.ops.block_max_kl import block_max_kl_loss
from msa.ops.block_max_kl import triton_impl

DEV = "cuda" if torch.cuda.is_available() else "cpu"
TOL = 1e-4 if DEV == "cpu" else 5e-4
LTOL = 1e-5 if DEV == "cpu" else 1e-4
if DEV == "cuda":  # the fp32 reference must not run its matmuls in TF32
    torch.backends.cuda.matmul.allow_tf32 = False

pytestmark = pytest.mark.usefixtures("nan_empty")


def _inputs(b, t, hkv, g, d, di, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    mk = lambda *s: (torch.randn(*s, generator=gen) * 1.5).to(DEV, dtype)  # noqa: E731
    qi, ki = mk(b, t, hkv, di).requires_grad_(), mk(b, t, di).requires_grad_()
    return qi, ki, mk(b, t, hkv * g, d), mk(b, t, hkv, d)


def _both(qi, ki, q, k, rows=0, **kw):
    """(loss, dq_idx, dk_idx) of the Triton and the reference backends on the same draws of rows."""
    out = []
    for backend in ("triton", "reference"):
        torch.manual_seed(11)
        loss = block_max_kl_loss(qi, ki, q, k, rows_per_sequence=rows, backend=backend, **kw)
        out.append((loss, *torch.autograd.grad(loss, (qi, ki))))
    return out


def _close(ours, ref, tol=TOL, ltol=LTOL):
    assert abs(ours[0].item() - ref[0].item()) <= ltol * max(1.0, abs(ref[0].item())), (ours[0], ref[0])
    assert ref[0].item() > 0
    for a, b in zip(ours[1:], ref[1:]):
        err = ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-6)).item()
        assert err < tol, err


@pytest.mark.parametrize("b,t,hkv,g,d,di,bs,cu,rows", [
    (1, 77, 2, 2, 16, 16, 16, None, 0),          # odd length, short last block
    (2, 50, 1, 3, 8, 16, 8, None, 0),            # B = 2, G = 3
    (1, 90, 2, 1, 16, 8, 16, [0, 33, 34, 90], 0),  # packed, a one-token sequence
    (1, 130, 1, 4, 16, 16, 32, [0, 70, 130], 9),  # packed, 9 sampled rows per sequence
    (1, 200, 2, 4, 32, 16, 16, None, 40),        # sampled rows over several row tiles
])
def test_matches_reference(b, t, hkv, g, d, di, bs, cu, rows):
    qi, ki, q, k = _inputs(b, t, hkv, g, d, di)
    cu_t = None if cu is None else torch.tensor(cu, dtype=torch.int32, device=DEV)
    ours, ref = _both(qi, ki, q, k, rows, block_size=bs, cu_seqlens=cu_t)
    _close(ours, ref)


def test_blocks_wider_than_a_key_tile(monkeypatch):
    """A block of 40 keys walked in tiles of 16 (the block's max and argmax carried across tiles)."""
    monkeypatch.setattr(triton_impl, "MAX_BLOCK_N", 16)
    qi, ki, q, k = _inputs(1, 101, 1, 2, 16, 16, seed=3)
    _close(*_both(qi, ki, q, k, block_size=40))


def test_rows_in_chunks(monkeypatch):
    """The teacher's per-head block log-sum-exps built one row tile at a time (a memory budget of one tile) and
    the student's block maxima two tiles per launch give the same loss and gradients as all rows at once."""
    qi, ki, q, k = _inputs(1, 200, 2, 4, 32, 16, seed=6)
    whole = _both(qi, ki, q, k, 40, block_size=16)[0]
    monkeypatch.setattr(triton_impl, "LSE_BUDGET", triton_impl.ROWS * 8 * 13 * 4)  # rows x H_q x blocks x fp32
    monkeypatch.setattr(triton_impl, "MAX_TILES", 2)  # the student's launches: 2 row tiles each
    chunked = _both(qi, ki, q, k, 40, block_size=16)
    _close(*chunked)
    _close(chunked[0], whole, tol=1e-6, ltol=1e-7)


@pytest.mark.skipif(DEV != "cuda", reason="CPU autocast leaves these ops in fp32, so only CUDA can show rounding")
def test_autocast_does_not_round_the_loss():
    """Under a bf16 autocast (as the trainer runs) the fp32 inputs' loss and gradients are unchanged."""
    qi, ki, q, k = _inputs(1, 60, 1, 2, 16, 16, seed=4)
    plain = _both(qi, ki, q, k, block_size=16)[0]
    with torch.autocast(DEV, dtype=torch.bfloat16):
        loss = block_max_kl_loss(qi, ki, q, k, block_size=16, backend="triton")
        grads = torch.autograd.grad(loss, (qi, ki))
    _close((loss, *grads), plain, tol=1e-6, ltol=1e-7)


def test_teacher_gets_no_gradient_and_scale_is_used():
    qi, ki, q, k = _inputs(1, 40, 1, 2, 16, 16, seed=5)
    q.requires_grad_()
    k.requires_grad_()
    loss = block_max_kl_loss(qi, ki, q, k, block_size=8, backend="triton")
    assert torch.autograd.grad(loss, (q, k), allow_unused=True) == (None, None)
    other = block_max_kl_loss(qi, ki, q, k, block_size=8, scale=0.1, backend="triton")
    ref = block_max_kl_loss(qi, ki, q, k, block_size=8, scale=0.1, backend="reference")
    assert abs(other.item() - ref.item()) <= LTOL * max(1.0, ref.item()) and abs(other.item() - loss.item()) > 1e-3


@pytest.mark.skipif(DEV != "cuda", reason="bf16 arithmetic is wrong in the Triton interpreter")
def test_bf16_inputs():
    qi, ki, q, k = _inputs(1, 2048, 2, 4, 64, 128, dtype=torch.bfloat16, seed=9)
    _close(*_both(qi, ki, q, k, 256, block_size=128), tol=2e-2, ltol=2e-3)


def test_bad_arguments():
    qi, ki, q, k = _inputs(1, 20, 1, 2, 8, 8)
    with pytest.raises(ValueError, match="rows_per_sequence must be >= 0"):
        block_max_kl_loss(qi, ki, q, k, block_size=4, rows_per_sequence=-1)
    with pytest.raises(ValueError, match="k_idx must have shape"):
        block_max_kl_loss(qi, ki[:, :5], q, k, block_size=4)
    with pytest.raises(ValueError, match="block_size"):
        block_max_kl_loss(qi, ki, q, k, block_size=0)
