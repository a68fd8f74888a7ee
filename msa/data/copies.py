"""Synthetic copies planted in training windows: a span of a window's own code repeated later in it,
the training counterpart of the retrieval evaluation's ``copy`` task (``msa.evals.retrieval``).

Why: copying a span seen far back is what induction heads do, and a small model trained on a few
tens of millions of tokens of plain code has not formed them (every quality run, dense included,
scored 0 on the copy task and on the fact tasks), so the retrieval evaluation could not compare
attentions. Repeated spans are the data on which the copy circuit forms fastest; planting them in a
share of the training windows, the same for every run, makes copying learnable within the budget,
and then the evaluation asks the real question: can a sparse attention still find the first
occurrence when it is far outside a local window? Validation and test windows stay untouched.

A planted window keeps its length: ``copies_per_window`` spans of 48-127 tokens are drawn at
random positions of its longest piece (one document: a span and its repeat never straddle a
document boundary) and each is inserted again at a uniform later position; the piece's last tokens
make room. The repeats take at most half of the piece: when all of them would not fit, as many as
fit go in (``survey`` says how many). Which windows, spans and positions: a function of
(seed, epoch, window), so a resumed run sees the same data.
"""

from __future__ import annotations

from typing import Tuple

import numpy as np

from .planting import Planter, splice

MIN_SPAN, MAX_SPAN = 48, 128  # span lengths in tokens, [MIN_SPAN, MAX_SPAN); the eval's spans are >= 48 tokens


class CopyPlanter(Planter):
    """fraction: share of training windows planted (0..1); copies_per_window: repeated spans per planted
    window; seed: the run's seed. ``apply(pieces, epoch, window)`` is the loader's transform."""

    # a stream apart from FactPlanter's, so both can plant the same window independently
    UNIT, COUNT, STREAM = "copies", "copies_per_window", 69621

    def __init__(self, *, fraction: float, copies_per_window: int, seed: int):
        super().__init__(fraction=fraction, count=copies_per_window, seed=seed)

    def _plant(self, piece: np.ndarray, rng: np.random.Generator) -> Tuple[np.ndarray, int]:
        """Each repeat copies ``piece[src:src + L]`` of the kept text to a uniform position after the span's end."""
        n = len(piece)
        lens = rng.integers(MIN_SPAN, MAX_SPAN, size=self.n)
        # the kept text must hold every span before its repeat: base >= L + 1, repeats <= half the piece
        cost = np.cumsum(lens)
        m = int(np.searchsorted(cost, n // 2, side="right"))
        while m > 0 and n - int(cost[m - 1]) < int(lens[:m].max()) + 1:
            m -= 1
        if m == 0:
            return piece, 0
        lens = lens[:m]
        base = n - int(cost[m - 1])  # tokens of the original piece that stay
        src = (rng.random(m) * (base - lens + 1)).astype(np.int64)   # span j = piece[src_j : src_j + L_j]
        lo = src + lens                                               # its repeat goes at a cut in [lo, base]
        dst = lo + (rng.random(m) * (base - lo + 1)).astype(np.int64)
        order = np.argsort(dst, kind="stable")
        out = splice(piece, base, [(int(dst[j]), piece[int(src[j]):int(src[j]) + int(lens[j])]) for j in order])
        assert len(out) == n
        return out, m
