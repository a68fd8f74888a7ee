"""Synthetic facts planted in training windows: constants defined in the real code of a window and
asserted later in it, the format of the retrieval evaluation (``msa.evals.retrieval``).

Why: exact retrieval of a 5-digit value needs a model that has learned to copy from far back; a
small model trained on a few tens of millions of tokens of plain code never gets there (every
quality run scored 0, dense included), so the evaluation cannot compare attentions. Planting the
skill's format into a share of the training windows teaches it within the budget, the same for
every run, while validation and test windows stay untouched (LM losses remain comparable).

A planted window keeps its length: ``facts_per_window`` lines ``NAME = 12345`` go in at random
token positions of its longest piece (one document: a fact and its question never straddle a
document boundary), each followed later in the same piece by ``assert NAME == 12345``; the piece's
last tokens make room. The planted lines take at most half of the piece: when all of them would not
fit, as many as fit go in (``FactPlanter.survey`` says how many a loader's windows get, and the
trainer logs it), so a short context never silently trains on plain code alone. Which windows,
names, values and positions: a function of (seed, epoch, window), so a resumed run sees the same data.
"""

from __future__ import annotations

import string
from typing import Tuple

import numpy as np

from .planting import Planter, splice


def random_name(rng: np.random.Generator) -> str:
    """A fresh lowercase identifier: two words of 4-6 random letters joined by "_"."""
    return "_".join("".join(rng.choice(list(string.ascii_lowercase), size=int(rng.integers(4, 7))))
                    for _ in range(2))


def random_value(rng: np.random.Generator) -> str:
    """A 5-digit integer literal."""
    return str(int(rng.integers(10000, 100000)))


class FactPlanter(Planter):
    """fraction: share of training windows planted (0..1); facts_per_window: facts (and questions)
    per planted window; tokenizer: the corpus tokenizer (``encode_batch``)."""

    UNIT, COUNT, STREAM = "facts", "facts_per_window", 48271

    def __init__(self, tokenizer, *, fraction: float, facts_per_window: int, seed: int):
        super().__init__(fraction=fraction, count=facts_per_window, seed=seed)
        self.tok = tokenizer

    def _name(self, rng) -> str:
        name = random_name(rng)
        return name.upper() if rng.random() < 0.5 else name

    def _plant(self, piece: np.ndarray, rng: np.random.Generator) -> Tuple[np.ndarray, int]:
        n = len(piece)
        names = [self._name(rng) for _ in range(self.n)]
        values = [random_value(rng) for _ in range(self.n)]
        enc = self.tok.encode_batch([f"\n{a} = {v}\n" for a, v in zip(names, values)]
                                    + [f"\nassert {a} == {v}\n" for a, v in zip(names, values)])
        cost = np.cumsum([len(f) + len(a) for f, a in zip(enc[:self.n], enc[self.n:])])
        m = int(np.searchsorted(cost, n // 2, side="right"))  # facts whose lines fit in half the piece
        if m == 0:
            return piece, 0
        facts, asks = enc[:m], enc[self.n:self.n + m]
        base = n - int(cost[m - 1])
        # fact j at token fpos[j] of the kept text, its question at a uniform later position
        fpos = rng.integers(0, base, size=m)
        apos = np.minimum(base, fpos + 1 + (rng.random(m) * (base - fpos)).astype(np.int64))
        inserts = sorted([(int(p), 0, j) for j, p in enumerate(fpos)] + [(int(p), 1, j) for j, p in enumerate(apos)])
        out = splice(piece, base, [(p, facts[j] if kind == 0 else asks[j]) for p, kind, j in inserts])
        assert len(out) == n
        return out, m
