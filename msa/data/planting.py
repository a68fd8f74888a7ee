"""What every planter of synthetic training text shares (``msa.data.facts``, ``msa.data.copies``): which windows
are planted (a seeded draw per (epoch, window), so a resumed run sees the same data), that only a window's
longest piece (one document) is changed and keeps its length, the survey of how much went in, and the splice."""

from __future__ import annotations

from typing import Callable, Dict, List, Sequence, Tuple

import numpy as np


class Planter:
    """fraction: share of training windows planted (0..1); count: items per planted window (named ``COUNT``
    in errors and surveys); seed: the run's seed. Subclasses set ``UNIT`` ("facts"), ``COUNT``
    ("facts_per_window"), ``STREAM`` (a constant that keeps their draws apart) and implement ``_plant``."""

    UNIT, COUNT, STREAM = "items", "count", 0

    def __init__(self, *, fraction: float, count: int, seed: int):
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"fraction must be in [0, 1], got {fraction}")
        if count < 1:
            raise ValueError(f"{self.COUNT} must be >= 1, got {count}")
        self.fraction, self.n, self.seed = float(fraction), int(count), int(seed)

    def rng(self, epoch: int, window: int) -> np.random.Generator:
        return np.random.Generator(np.random.PCG64([self.seed, self.STREAM, int(epoch), int(window)]))

    def _plant(self, piece: np.ndarray, rng: np.random.Generator) -> Tuple[np.ndarray, int]:
        """(piece with the items spliced in, same length and dtype; how many went in)."""
        raise NotImplementedError

    def plant(self, piece: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """piece with as many of the ``count`` drawn items as fit spliced in, same length and dtype (a piece
        too short for even one comes back unchanged)."""
        return self._plant(piece, rng)[0]

    def apply(self, pieces: List[np.ndarray], epoch: int, window: int) -> List[np.ndarray]:
        """The window's pieces (token arrays of its documents), the longest one planted when this window is
        drawn for planting; other pieces and every length unchanged."""
        return self.apply_counted(pieces, epoch, window)[0]

    def apply_counted(self, pieces: List[np.ndarray], epoch: int, window: int) -> Tuple[List[np.ndarray], int]:
        """``apply``'s pieces and the number of items planted in them (0 when the window is not drawn or its
        longest piece cannot hold one)."""
        rng = self.rng(epoch, window)
        if self.fraction == 0.0 or rng.random() >= self.fraction:
            return pieces, 0
        i = int(np.argmax([len(p) for p in pieces]))
        out = list(pieces)
        out[i], m = self._plant(pieces[i], rng)
        return out, m

    def survey(self, pieces_of: Callable[[int], List[np.ndarray]], windows: Sequence[int],
               epoch: int = 0) -> Dict[str, float]:
        """How the planter treats ``windows`` (``pieces_of(w)``: window w's token pieces): the share planted and
        the mean items per planted window ("<UNIT>_per_planted_window", at most ``count``). A function of
        (epoch, window) only, so surveying changes no training state."""
        counts = [self.apply_counted(pieces_of(w), epoch, w)[1] for w in windows]
        planted = [c for c in counts if c > 0]
        return {"windows": len(counts), "planted_share": len(planted) / max(1, len(counts)),
                f"{self.UNIT}_per_planted_window": sum(planted) / max(1, len(planted)), self.COUNT: self.n}


def splice(piece: np.ndarray, base: int, inserts: List[Tuple[int, np.ndarray]]) -> np.ndarray:
    """piece[:base] with each (cut, tokens) inserted before token ``cut`` of it (cuts in [0, base], in the
    order given: sort them first), in piece's dtype."""
    parts, prev = [], 0
    for cut, tokens in inserts:
        parts.append(piece[prev:cut])
        parts.append(np.asarray(tokens, dtype=piece.dtype))
        prev = cut
    parts.append(piece[prev:base])
    return np.concatenate(parts)
