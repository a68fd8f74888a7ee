"""Indexer recall metrics against a direct per-query computation."""

import pytest
import torch

import msa
from msa.metrics import indexer_recall


def naive_recall(q, k, idx, bs, init_blocks=0, local_blocks=1):
    t, hq, d = q.shape[1:]
    hkv, topk = k.shape[2], idx.shape[-1]
    g = hq // hkv
    brs, srs, sms, ents, halves, oms, rules = [], [], [], [], [], [], []
    for i in range(t):
        nvis = i // bs + 1
        if nvis <= topk:
            continue
        for r in range(hkv):
            p = sum(torch.softmax(q[0, i, h] @ k[0, :i + 1, r].T * d ** -0.5, -1) for h in range(r * g, r * g + g)) / g
            mass = torch.stack([p[b * bs:(b + 1) * bs].sum() for b in range(nvis)])
            star = set(mass.topk(topk).indices.tolist())
            sel = {x for x in idx[0, i, r].tolist() if x >= 0}
            brs.append(len(star & sel) / len(star))
            srs.append(float(sum(mass[x] for x in star & sel) / sum(mass[x] for x in star)))
            sms.append(float(sum(mass[x] for x in sel)))
            ents.append(float(-(p * p.log()).sum()))
            head = set(sorted(range(nvis), key=lambda b: -float(mass[b]))[:(topk + 1) // 2])
            halves.append(len(head & sel) / len(head))
            oms.append(float(sum(mass[x] for x in star)))
            # a perfect student under the rule: forced blocks, then the largest max token probabilities
            own = nvis - 1
            forced = [b for b in range(nvis) if b < init_blocks or own - local_blocks < b <= own]
            rest = sorted((b for b in range(nvis) if b not in forced), key=lambda b: -float(p[b * bs:(b + 1) * bs].max()))
            rules.append(len(star & set((forced + rest)[:topk])) / len(star))
    n = len(brs)
    return (sum(brs) / n, sum(srs) / n, sum(sms) / n, sum(ents) / n, sum(halves) / n, sum(oms) / n,
            sum(rules) / n)


def test_recall_matches_naive_and_is_one_for_the_oracle_selection():
    torch.manual_seed(0)
    q, k = torch.randn(1, 90, 4, 8, dtype=torch.float64), torch.randn(1, 90, 2, 8, dtype=torch.float64)
    q_idx, k_idx = torch.randn(1, 90, 2, 4, dtype=torch.float64), torch.randn(1, 90, 4, dtype=torch.float64)
    idx = msa.select_blocks(q_idx, k_idx, block_size=8, topk=3)
    got = indexer_recall(q, k, idx, block_size=8)
    br, sr, sm, ent, half, om, rule = naive_recall(q, k, idx, 8)
    assert abs(got["block_recall"] - br) < 1e-6 and abs(got["score_recall"] - sr) < 1e-6
    assert abs(got["selected_mass"] - sm) < 1e-6 and abs(got["teacher_entropy"] - ent) < 1e-6
    assert abs(got["top_half_recall"] - half) < 1e-6 and abs(got["oracle_mass"] - om) < 1e-6
    assert got["top_half_recall"] != got["block_recall"] and got["oracle_mass"] > got["selected_mass"]
    assert abs(got["max_rule_recall"] - rule) < 1e-6 and got["max_rule_recall"] != got["block_recall"]
    for init, local in ((1, 1), (0, 2)):
        other = indexer_recall(q, k, idx, block_size=8, init_blocks=init, local_blocks=local)
        assert abs(other["max_rule_recall"] - naive_recall(q, k, idx, 8, init, local)[-1]) < 1e-6
        assert abs(other["block_recall"] - br) < 1e-6  # the selection's recall does not depend on the rule
    assert got["block_recall"] < 0.9  # random indexer: far from perfect
    with pytest.raises(ValueError, match="local_blocks must be an int >= 1"):
        indexer_recall(q, k, idx, block_size=8, local_blocks=0)
    # selecting exactly I* (top blocks by attention mass) must give recall 1
    t, bs, topk = 90, 8, 3
    star = torch.full((1, t, 2, topk), -1, dtype=torch.int32)
    for i in range(t):
        nvis = i // bs + 1
        for r in range(2):
            p = sum(torch.softmax(q[0, i, h] @ k[0, :i + 1, r].T * 8 ** -0.5, -1) for h in (2 * r, 2 * r + 1)) / 2
            mass = torch.stack([p[b * bs:(b + 1) * bs].sum() for b in range(nvis)])
            ids = mass.topk(min(topk, nvis)).indices
            star[0, i, r, :len(ids)] = ids.to(torch.int32)
    perfect = indexer_recall(q, k, star, block_size=8)
    assert abs(perfect["block_recall"] - 1) < 1e-9 and abs(perfect["score_recall"] - 1) < 1e-9
    assert abs(perfect["top_half_recall"] - 1) < 1e-9 and abs(perfect["oracle_mass"] - perfect["selected_mass"]) < 1e-9
    assert perfect["selected_mass"] > got["selected_mass"]  # no selection holds more than the best top-k
