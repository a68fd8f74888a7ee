"""Induction: does the model copy what it has seen? A sequence of L random tokens followed by the same L
tokens; a model that copies predicts the second occurrence from the first (induction heads: attend to
the token after the earlier occurrence of the current one), a model that does not is as lost on the
second as on the first. Unlike the retrieval tasks it needs no name-value binding and no exact answer,
so it shows the skill forming in a young model, step by step through training.

Two periods: ``near`` = min(256, seq_len // 2), whose copy sits within a few blocks of the query (any
attention that sees the last blocks can copy it), and ``far`` = seq_len // 2, half a context back, which a
sparse attention copies only if its index selects the blocks of the first occurrence.
"""

from __future__ import annotations

from typing import Dict, List, Optional

import torch

from ..ops.common import check
from .capture import unwrap
from .lm import autocast_ctx


def induction_periods(seq_len: int) -> List[int]:
    """[near, far] periods for a context of seq_len tokens (one when they coincide); seq_len >= 4."""
    check(seq_len >= 4, f"seq_len must be >= 4 (a period of at least 2 tokens, repeated), got {seq_len}")
    far = seq_len // 2
    return sorted({min(256, far), far})


@torch.no_grad()
def induction_eval(model: torch.nn.Module, vocab_size: int, *, seq_len: int, samples: int, device,
                   autocast_dtype: Optional[torch.dtype] = None, seed: int = 0) -> Dict[str, Dict[str, float]]:
    """For each period L of ``induction_periods(seq_len)``: ``samples`` prompts of L tokens drawn uniformly
    from [0, vocab_size) (seeded by (seed, L)) repeated once, the model in its current mode.

    Returns {str(L): {"first_nll": mean NLL of tokens 2..L of the first occurrence (chance: about
    ln vocab_size), "second_nll": the same for tokens 2..L of the repeat, "gain": first_nll - second_nll
    (nats per token; ~0 without induction), "second_acc": top-1 accuracy on those repeat tokens}}.
    The repeat's first token is left out: only a model that knows the period could predict it."""
    check(samples >= 1, f"samples must be >= 1, got {samples}")
    check(vocab_size >= 2, f"vocab_size must be >= 2, got {vocab_size}")
    periods = induction_periods(seq_len)
    m = unwrap(model)
    m.eval()
    out: Dict[str, Dict[str, float]] = {}
    for period in periods:
        g = torch.Generator().manual_seed(seed * 1_000_003 + period)
        # row r predicts token r + 1: rows 0..L-2 -> first occurrence, rows L..2L-2 -> the repeat
        rows = torch.cat([torch.arange(0, period - 1), torch.arange(period, 2 * period - 1)]).to(device)
        first, second, hits, n = 0.0, 0.0, 0, 0
        for _ in range(samples):
            seq = torch.randint(0, vocab_size, (period,), generator=g)
            ids = torch.cat([seq, seq]).to(device).view(1, -1)
            with autocast_ctx(torch.device(device), autocast_dtype):
                logits = m(ids, compute_kl=False).logits[0]
            lg = logits[rows].float()   # only these rows in fp32: (2L, vocab) would be large at 16K
            tgt = ids[0, rows + 1]
            nll = torch.nn.functional.cross_entropy(lg, tgt, reduction="none")
            first += float(nll[:period - 1].sum())
            second += float(nll[period - 1:].sum())
            hits += int((lg[period - 1:].argmax(-1) == tgt[period - 1:]).sum())
            n += period - 1
        out[str(period)] = {"first_nll": first / n, "second_nll": second / n, "gain": (first - second) / n,
                            "second_acc": hits / n}
    m.train()
    return out
