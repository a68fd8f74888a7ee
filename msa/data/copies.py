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
fit go in (``CopyPlanter.survey`` says how many). Which windows, spans and positions: a function of
(seed, epoch, window), so a resumed run sees the same data.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Sequence, Tuple

import numpy as np

MIN_SPAN, MAX_SPAN = 48, 128  # span lengths in tokens, [MIN_SPAN, MAX_SPAN); the eval's spans are >= 48 tokens


class CopyPlanter:
    """fraction: share of training windows planted (0..1); copies_per_window: repeated spans per planted
    window; seed: the run's seed. ``apply(pieces, epoch, window)`` is the loader's transform."""

    def __init__(self, *, fraction: float, copies_per_window: int, seed: int):
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"fraction must be in [0, 1], got {fraction}")
        if copies_per_window < 1:
            raise ValueError(f"copies_per_window must be >= 1, got {copies_per_window}")
        self.fraction, self.n, self.seed = float(fraction), int(copies_per_window), int(seed)

    def rng(self, epoch: int, window: int) -> np.random.Generator:
        # a stream apart from FactPlanter's (48271), so both can plant the same window independently
        return np.random.Generator(np.random.PCG64([self.seed, 69621, int(epoch), int(window)]))

    def apply(self, pieces: List[np.ndarray], epoch: int, window: int) -> List[np.ndarray]:
        """The window's pieces (token arrays of its documents), the longest one planted when this window
        is drawn for planting; other pieces and every length unchanged."""
        return self.apply_counted(pieces, epoch, window)[0]

    def apply_counted(self, pieces: List[np.ndarray], epoch: int, window: int) -> Tuple[List[np.ndarray], int]:
        """``apply``'s pieces and the number of spans repeated in them (0 when the window is not drawn or
        its longest piece cannot hold one)."""
        rng = self.rng(epoch, window)
        if self.fraction == 0.0 or rng.random() >= self.fraction:
            return pieces, 0
        i = int(np.argmax([len(p) for p in pieces]))
        out = list(pieces)
        out[i], m = self.plant(pieces[i], rng)
        return out, m

    def plant(self, piece: np.ndarray, rng: np.random.Generator) -> Tuple[np.ndarray, int]:
        """(piece with the repeats spliced in, same length and dtype; the number of repeats). Each repeat
        copies ``piece[src:src + L]`` of the kept text to a uniform position after the span's end."""
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
        parts, prev = [], 0
        for j in np.argsort(dst, kind="stable"):
            p = int(dst[j])
            parts.append(piece[prev:p])
            parts.append(piece[int(src[j]):int(src[j]) + int(lens[j])])
            prev = p
        parts.append(piece[prev:base])
        out = np.concatenate(parts)
        assert len(out) == n
        return out, m

    def survey(self, pieces_of: Callable[[int], List[np.ndarray]], windows: Sequence[int],
               epoch: int = 0) -> Dict[str, float]:
        """How the planter treats ``windows`` (``pieces_of(w)``: window w's token pieces): the share planted
        and the mean repeats per planted window (at most ``copies_per_window``). A function of (epoch,
        window) only, so surveying changes no training state."""
        counts = [self.apply_counted(pieces_of(w), epoch, w)[1] for w in windows]
        planted = [c for c in counts if c > 0]
        return {"windows": len(counts), "planted_share": len(planted) / max(1, len(counts)),
                "copies_per_planted_window": sum(planted) / max(1, len(planted)), "copies_per_window": self.n}
