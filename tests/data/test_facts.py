"""msa.data.facts: synthetic facts planted in training windows (same length, one document, every
question after its definition, the original text kept in order, deterministic per epoch and window)."""

import inspect
import re

import numpy as np
import pytest
import torch

import msa.data.dataset as dataset_module
from msa.data import ByteTokenizer, FactPlanter, TokenizedSplit, WindowLoader, make_windows

from ..train.common import tiny_config

FACT = re.compile(r"\n([A-Za-z_]+) = (\d{5})\n")
ASK = re.compile(r"\nassert ([A-Za-z_]+) == (\d{5})\n")


def _code_tokens() -> np.ndarray:
    """Real code (this repository's dataset module) as byte tokens."""
    text = inspect.getsource(dataset_module) * 2
    return np.frombuffer(text.encode(), dtype=np.uint8).astype(np.int32)


def test_plant_keeps_length_and_text_and_orders_questions():
    tok = ByteTokenizer()
    piece = _code_tokens()[:6000]
    p = FactPlanter(tok, fraction=1.0, facts_per_window=8, seed=1)
    out = p.plant(piece, p.rng(0, 3))
    assert out.shape == piece.shape and out.dtype == piece.dtype
    text = tok.decode(out.tolist())
    facts = {m.group(1): (m.start(), m.group(2)) for m in FACT.finditer(text)}
    asks = {m.group(1): (m.start(), m.group(2)) for m in ASK.finditer(text)}
    assert len(facts) == len(asks) == 8 and set(facts) == set(asks)
    for name, (pos, value) in asks.items():
        assert facts[name][1] == value and facts[name][0] < pos     # defined before it is asked
    # without the planted lines the text is the piece's beginning, in order
    rest = text
    for m in list(FACT.finditer(text)) + list(ASK.finditer(text)):
        rest = rest.replace(m.group(0), "", 1)
    original = tok.decode(piece.tolist())
    assert original.startswith(rest) and len(original) - len(rest) == sum(
        len(m.group(0)) for m in list(FACT.finditer(text)) + list(ASK.finditer(text)))
    # a piece too short for all of them takes the first ones that fit in half its tokens; one too
    # short for even one is left alone
    mid = piece[:600]
    got, m = p._plant(mid, p.rng(0, 3))
    asked = ASK.findall(tok.decode(got.tolist()))
    assert 1 <= m < 8 and len(asked) == m and len(FACT.findall(tok.decode(got.tolist()))) == m
    assert set(asked) < set(ASK.findall(text))               # some of the same (name, value) facts as above
    planted = len(mid) - len(_kept(tok.decode(got.tolist())))
    assert planted <= len(mid) // 2 < planted + 60                           # one more would not fit
    short = piece[:40]
    assert np.array_equal(p.plant(short, p.rng(0, 3)), short)


def _kept(text: str) -> str:
    for m in list(FACT.finditer(text)) + list(ASK.finditer(text)):
        text = text.replace(m.group(0), "", 1)
    return text


def test_survey_counts_what_fits():
    tok = ByteTokenizer()
    code = _code_tokens()
    p = FactPlanter(tok, fraction=0.5, facts_per_window=8, seed=2)
    long_st = p.survey(lambda w: [code[:6000]], range(200))
    assert 0.4 < long_st["planted_share"] < 0.6 and long_st["facts_per_planted_window"] == 8
    short_st = p.survey(lambda w: [code[:600]], range(200))
    assert short_st["planted_share"] == long_st["planted_share"]          # the same windows are drawn
    assert 1 <= short_st["facts_per_planted_window"] < 8
    for w in range(20):                                                  # it counts what apply plants
        out, m = p.apply_counted([code[:600]], 0, w)
        assert len(ASK.findall(tok.decode(out[0].tolist()))) == m


def test_which_windows_and_determinism():
    tok = ByteTokenizer()
    piece = _code_tokens()[:3000]
    p = FactPlanter(tok, fraction=0.3, facts_per_window=4, seed=7)
    planted = [not np.array_equal(p.apply([piece], 0, w)[0], piece) for w in range(400)]
    assert 0.22 < np.mean(planted) < 0.38                 # binomial(400, 0.3): 4 sigma = 0.09
    w = planted.index(True)
    assert np.array_equal(p.apply([piece], 0, w)[0], p.apply([piece], 0, w)[0])
    again = [not np.array_equal(p.apply([piece], 1, w)[0], piece) for w in range(400)]
    assert again != planted                               # a new epoch draws again
    off = FactPlanter(tok, fraction=0.0, facts_per_window=4, seed=7)
    assert all(off.apply([piece], 0, w)[0] is piece for w in range(20))
    with pytest.raises(ValueError, match="fraction"):
        FactPlanter(tok, fraction=1.5, facts_per_window=4, seed=0)
    with pytest.raises(ValueError, match="facts_per_window"):
        FactPlanter(tok, fraction=0.5, facts_per_window=0, seed=0)


def loader_split():
    """A split of eight documents of real code (700-2400 byte tokens) and its 1000-token windows."""
    toks = _code_tokens()[:13000]
    lengths = [1500, 700, 2100, 1900, 2400, 900, 1800, 1700]
    offs = np.zeros(len(lengths) + 1, dtype=np.int64)
    offs[1:] = np.cumsum(lengths)
    sp = TokenizedSplit(toks[:offs[-1]].copy(), offs, [f"d{i}" for i in range(len(lengths))])
    return sp, make_windows(sp, 1000)


def assert_position_is_the_state(make_loader, skip: int = 8):
    """A planter is a function of (epoch, window): a loader restored from another's state after ``skip`` batches
    gives the batches the first one gives next."""
    first = make_loader()
    for _ in range(skip):
        first.next()
    ref = [first.next().input_ids for _ in range(3)]
    again = make_loader()
    for _ in range(skip):
        again.next()
    resumed = make_loader()
    resumed.load_state_dict(again.state_dict())
    assert all(torch.equal(x, resumed.next().input_ids) for x in ref)


def test_loader_plants_the_longest_piece_and_resumes():
    sp, w = loader_split()
    tok = ByteTokenizer()
    plain = WindowLoader(sp.tokens, w, 2, seed=3)
    planted = WindowLoader(sp.tokens, w, 2, seed=3, planters=[FactPlanter(tok, fraction=1.0, facts_per_window=2, seed=3)])
    changed = 0
    for _ in range(8):
        a, b = plain.next(), planted.next()
        assert a.windows == b.windows and torch.equal(a.cu_seqlens, b.cu_seqlens)
        cu = a.cu_seqlens.tolist()
        spans = list(zip(cu[:-1], cu[1:]))
        for k in range(len(a.windows)):   # window k is tokens [1000 k, 1000 (k + 1)) of the row
            mine = [(s, e) for s, e in spans if 1000 * k <= s < 1000 * (k + 1)]
            longest = max(mine, key=lambda x: x[1] - x[0])
            for s, e in mine:
                same = torch.equal(a.input_ids[0, s:e], b.input_ids[0, s:e])
                assert same == ((s, e) != longest)
                if not same:
                    assert len(ASK.findall(tok.decode(b.input_ids[0, s:e].tolist()))) == 2
                    changed += 1
    assert changed == 16
    assert_position_is_the_state(lambda: WindowLoader(
        sp.tokens, w, 2, seed=3, planters=[FactPlanter(tok, fraction=1.0, facts_per_window=2, seed=3)]))


def test_config_checks_the_fact_options():
    with pytest.raises(ValueError, match="data.synthetic_facts"):
        tiny_config("data.synthetic_facts=1.5")
    with pytest.raises(ValueError, match="data.facts_per_window"):
        tiny_config("data.facts_per_window=0")
