"""msa.data.copies: spans of a window's own code repeated later in it (same length, one document, each
repeat after its source, the original text kept in order, deterministic per epoch and window)."""

import numpy as np
import pytest
import torch

from msa.data import ByteTokenizer, CopyPlanter, FactPlanter, WindowLoader
from msa.data.copies import MAX_SPAN, MIN_SPAN

from ..train.common import tiny_config
from .test_facts import ASK, _code_tokens, assert_position_is_the_state, loader_split


def _split_inserted(out: np.ndarray):
    """For a planted arange piece: (the kept tokens, [(kept tokens before the run, inserted run)]). Kept tokens
    are the running 0, 1, 2, ...; anything else was inserted (a repeat's values all lie below its cut)."""
    kept, runs, last = [], [], -2
    for i, x in enumerate(out.tolist()):
        if x == len(kept):
            kept.append(x)
        elif last == i - 1 and runs[-1][1][-1] + 1 == x:
            runs[-1][1].append(x)
            last = i
        else:
            runs.append((len(kept), [x]))
            last = i
    return np.array(kept), runs


@pytest.mark.parametrize("window", range(6))
def test_plant_repeats_earlier_spans_and_keeps_the_text(window):
    piece = np.arange(3000, dtype=np.int32)     # every token distinct: a repeat is recognisable
    p = CopyPlanter(fraction=1.0, copies_per_window=8, seed=1)
    out, m = p._plant(piece, p.rng(0, window))
    assert out.shape == piece.shape and out.dtype == piece.dtype
    kept, runs = _split_inserted(out)
    assert np.array_equal(kept, piece[:len(kept)])                      # the original text, in order
    # eight spans of 48-127 tokens fit in half of 3000 tokens; adjacent repeats may read as one run
    assert m == 8 and len(piece) - len(kept) <= len(piece) // 2
    assert sum(len(r) for _, r in runs) == len(piece) - len(kept)
    for cut, run in runs:
        assert run[-1] < cut and len(run) >= MIN_SPAN      # a span of the text that ends before its repeat
    assert sum(MIN_SPAN <= len(r) < MAX_SPAN for _, r in runs) >= len(runs) - 2


def test_short_pieces_take_fewer_or_none():
    p = CopyPlanter(fraction=1.0, copies_per_window=8, seed=2)
    mid = np.arange(400, dtype=np.int32)
    out, m = p._plant(mid, p.rng(0, 0))
    kept, runs = _split_inserted(out)
    assert 1 <= m < 8 and len(mid) - len(kept) <= len(mid) // 2 and len(out) == len(mid)
    short = np.arange(90, dtype=np.int32)       # half of it holds no span of >= 48 tokens with its source
    got, m0 = p._plant(short, p.rng(0, 0))
    assert m0 == 0 and got is short


def test_which_windows_survey_and_determinism():
    piece = _code_tokens()[:3000]
    p = CopyPlanter(fraction=0.3, copies_per_window=4, seed=7)
    planted = [not np.array_equal(p.apply([piece], 0, w)[0], piece) for w in range(400)]
    assert 0.22 < np.mean(planted) < 0.38                 # binomial(400, 0.3): 4 sigma = 0.09
    w = planted.index(True)
    assert np.array_equal(p.apply([piece], 0, w)[0], p.apply([piece], 0, w)[0])
    assert [not np.array_equal(p.apply([piece], 1, w)[0], piece) for w in range(400)] != planted
    st = p.survey(lambda w: [piece], range(400))
    assert st["planted_share"] == np.mean(planted) and st["copies_per_planted_window"] == 4
    off = CopyPlanter(fraction=0.0, copies_per_window=4, seed=7)
    assert all(off.apply([piece], 0, w)[0] is piece for w in range(20))
    with pytest.raises(ValueError, match="fraction"):
        CopyPlanter(fraction=-0.1, copies_per_window=4, seed=0)
    with pytest.raises(ValueError, match="copies_per_window"):
        CopyPlanter(fraction=0.5, copies_per_window=0, seed=0)


def test_loader_applies_copies_then_facts_and_resumes():
    sp, w = loader_split()
    tok = ByteTokenizer()

    def planters():
        return [CopyPlanter(fraction=1.0, copies_per_window=2, seed=3),
                FactPlanter(tok, fraction=1.0, facts_per_window=2, seed=3)]

    copies_only = WindowLoader(sp.tokens, w, 2, seed=3, planters=planters()[:1])
    both = WindowLoader(sp.tokens, w, 2, seed=3, planters=planters())
    for _ in range(4):
        a, b = copies_only.next(), both.next()
        assert a.windows == b.windows and torch.equal(a.cu_seqlens, b.cu_seqlens)
        # the facts go into the text with the repeats: the same pieces, facts spliced on top, every question whole
        fp = planters()[1]
        cu = a.cu_seqlens.tolist()
        spans = list(zip(cu[:-1], cu[1:]))
        for k, win in enumerate(a.windows):
            mine = [(s, e) for s, e in spans if 1000 * k <= s < 1000 * (k + 1)]
            pieces = [a.input_ids[0, s:e].numpy() for s, e in mine]
            want = np.concatenate(fp.apply(pieces, 0, win))
            assert np.array_equal(want, b.input_ids[0, mine[0][0]:mine[-1][1]].numpy())
            assert len(ASK.findall(tok.decode(want.tolist()))) == 2
    assert_position_is_the_state(lambda: WindowLoader(sp.tokens, w, 2, seed=3, planters=planters()))


def test_config_checks_the_copy_options():
    with pytest.raises(ValueError, match="data.synthetic_copies"):
        tiny_config("data.synthetic_copies=1.5")
    with pytest.raises(ValueError, match="data.copies_per_window"):
        tiny_config("data.copies_per_window=0")
