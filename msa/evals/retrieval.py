"""Synthetic retrieval inside real code: facts planted as Python lines in held-out source code and
asked for at the end, scored by teacher-forced exact match of the answer's tokens (the same as
greedy decoding of the answer) and by the **fact gain**: the answer's mean NLL per token in a
control prompt without the lines that hold the asked values, minus the same in the real prompt
(nats; > 0 when the model reads the fact). Exact match needs a model that copies five digits
from far back; the gain shows how much a young model uses the fact before it can.

Tasks (every fact is a 5-digit integer bound to a fresh identifier):
- ``needle``: one constant defined at depth d, asked late (``assert NAME == ``).
- ``multi_needle``: four constants spread through the context; the one at depth d is asked.
- ``mqar``: multi-query associative recall: eight constants defined together at depth d, all eight
  asked at the end in a shuffled order (accuracy per query).
- ``var_track``: variable tracking: ``a = 52817`` at depth d, then a chain ``b = a``, ``c = b``,
  ... spread between d and the end; the last name is asked.
- ``copy``: a span of real code (lines from elsewhere in the test split, >= 48 tokens) at depth d,
  repeated at the end; its first line is the cue, each further line is one answer (accuracy per
  line). The copy that induction heads perform, graded per line, for models that do not yet bind
  a name to a value; a local window cannot see the span once it is further back than the window.
Depth d is the fraction of the context before the fact. Filler lines come from test-split
packages, decoded from their tokens and cut at line boundaries.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..data.facts import random_name, random_value
from .capture import unwrap
from .lm import autocast_ctx

TASKS = ("needle", "multi_needle", "mqar", "var_track", "copy")
COPY_TRIES = 64
COPY_MIN_TOKENS = 48  # a copy span: whole lines of at least 3 tokens, >= this many tokens, >= 3 lines


@dataclass
class Sample:
    """length: the requested context length (len(ids) is at most that, short by less than a line);
    ids: the whole prompt's tokens; answers: (start, end) token ranges whose tokens must be predicted
    (each from the token before it); control_ids / control_answers: the same prompt without the
    lines that hold the asked values (distractors and the chain of a variable-tracking sample stay)."""

    task: str
    length: int
    depth: float
    ids: List[int]
    answers: List[Tuple[int, int]]
    control_ids: List[int]
    control_answers: List[Tuple[int, int]]


@dataclass
class SampleScore:
    """exact: fraction of the answers whose every token is the argmax; nll: mean NLL per answer
    token (nats); control_nll: the same on the control prompt (None when not scored); gain:
    control_nll - nll."""

    exact: float
    nll: float
    control_nll: Optional[float] = None

    @property
    def gain(self) -> Optional[float]:
        return None if self.control_nll is None else self.control_nll - self.nll


class _Builder:
    def __init__(self, tokenizer, filler_tokens: np.ndarray, seed: int):
        self.tok, self.filler, self.seed = tokenizer, filler_tokens, seed

    def _rng(self, *key) -> np.random.Generator:
        words = [zlib.crc32(k.encode()) if isinstance(k, str) else int(k) for k in key]
        return np.random.Generator(np.random.PCG64([self.seed, *words]))

    def _filler_lines(self, rng, n_tokens: int) -> List[List[int]]:
        """Lines of real code (each line's tokens, encoded line by line) totalling >= n_tokens."""
        span = int(n_tokens * 1.5) + 256
        if len(self.filler) <= span:
            raise ValueError(f"the test split holds {len(self.filler)} tokens, too few for a {n_tokens}-token "
                             f"retrieval context; lower eval.retrieval_lengths or raise data.eval_corpus_mb")
        start = int(rng.integers(0, len(self.filler) - span))
        text = self.tok.decode(self.filler[start:start + span].tolist())
        lines = text.split("\n")[1:-1]  # drop the partial first and last lines
        enc = self.tok.encode_batch([ln + "\n" for ln in lines])
        out, total = [], 0
        for e in enc:
            if total >= n_tokens:
                break
            out.append(e)
            total += len(e)
        return out

    def _qa(self, prompt: str, answer: str) -> Tuple[List[int], List[Tuple[int, int]]]:
        """Tokens of prompt + answer and the answer's (start, end) within them (encoded together when
        the prompt's tokens are a prefix, else separately)."""
        p = self.tok.encode(prompt)
        full = self.tok.encode(prompt + answer)
        if not (full[:len(p)] == p and len(full) > len(p)):
            full = p + self.tok.encode(answer)
        return full, [(len(p), len(full))]

    def _copy_span(self, rng) -> List[List[int]]:
        """Lines of real code for a copy span: consecutive lines of >= 3 tokens each (blank and
        one-token lines would be free answers) until >= COPY_MIN_TOKENS tokens and >= 3 lines."""
        # a window can fall inside one long line (a data literal, minified code): draw another, up to
        # COPY_TRIES windows from the same seeded generator
        for _ in range(COPY_TRIES):
            lines = [ln for ln in self._filler_lines(rng, 8 * COPY_MIN_TOKENS) if len(ln) >= 3]
            out: List[List[int]] = []
            for ln in lines:
                out.append(ln)
                if sum(map(len, out)) >= COPY_MIN_TOKENS and len(out) >= 3:
                    return out
        raise ValueError(f"no copy span in {COPY_TRIES} windows of the test split: it has too few code "
                         "lines of 3 or more tokens")

    def build(self, task: str, length: int, depth: float, index: int) -> Sample:
        rng = self._rng(task, length, int(depth * 1000), index)
        facts: List[Tuple[float, List[int], bool]] = []  # (depth, tokens of a line, holds an asked value)
        queries: List[Tuple[str, str]] = []
        qa: List[Tuple[List[int], List[Tuple[int, int]]]] = []  # (tokens, answer ranges within them)
        if task == "copy":
            span = self._copy_span(rng)
            facts.append((depth, [t for ln in span for t in ln], True))
            ids, ranges = list(span[0]), []
            for ln in span[1:]:
                ranges.append((len(ids), len(ids) + len(ln)))
                ids += ln
            qa.append((ids, ranges))
        elif task == "needle":
            n, v = random_name(rng).upper(), random_value(rng)
            facts.append((depth, self.tok.encode(f"{n} = {v}\n"), True))
            queries.append((f"assert {n} ==", f" {v}"))
        elif task == "multi_needle":
            depths = sorted({depth, *[float(x) for x in rng.uniform(0.05, 0.95, size=3)]})
            for d in depths:
                n, v = random_name(rng).upper(), random_value(rng)
                facts.append((d, self.tok.encode(f"{n} = {v}\n"), d == depth))
                if d == depth:
                    queries.append((f"assert {n} ==", f" {v}"))
        elif task == "mqar":
            pairs = [(random_name(rng).upper(), random_value(rng)) for _ in range(8)]
            for j, (n, v) in enumerate(pairs):
                facts.append((depth + j * 1e-6, self.tok.encode(f"{n} = {v}\n"), True))
            for j in rng.permutation(len(pairs)):
                n, v = pairs[int(j)]
                queries.append((f"assert {n} ==", f" {v}"))
        elif task == "var_track":
            names = [random_name(rng) for _ in range(4)]
            v = random_value(rng)
            ds = [depth] + sorted(float(x) for x in rng.uniform(depth, 0.95, size=len(names) - 1))
            facts.append((ds[0], self.tok.encode(f"{names[0]} = {v}\n"), True))
            for a, b_, d in zip(names[:-1], names[1:], ds[1:]):
                facts.append((d, self.tok.encode(f"{b_} = {a}\n"), False))
            queries.append((f"assert {names[-1]} ==", f" {v}"))
        else:
            raise ValueError(f"task must be one of {TASKS}, got {task!r}")
        qa += [self._qa(q, a) for q, a in queries]
        tail = sum(len(ids) + 1 for ids, _ in qa)
        budget = length - tail - sum(len(f) for _, f, _ in facts)
        if budget < 16:
            raise ValueError(f"length {length} is too short for task {task!r}")
        lines = self._filler_lines(rng, budget)
        facts.sort(key=lambda f: f[0])
        ids, answers = self._assemble(facts, lines, budget, qa, keep_values=True)
        cids, canswers = self._assemble(facts, lines, budget, qa, keep_values=False)
        return Sample(task, length, depth, ids, answers, cids, canswers)

    def _assemble(self, facts, lines, budget: int, qa, *, keep_values: bool):
        """Filler lines with the facts inserted at their depths, then the questions; keep_values=False
        leaves out the lines that hold asked values (the control), at the same filler positions."""
        ids: List[int] = []
        fi = filled = 0
        for ln in lines:
            while fi < len(facts) and filled >= facts[fi][0] * budget:
                if keep_values or not facts[fi][2]:
                    ids += facts[fi][1]
                fi += 1
            if filled + len(ln) > budget:
                break
            ids += ln
            filled += len(ln)
        for _, f, holds in facts[fi:]:
            if keep_values or not holds:
                ids += f
        nl = self.tok.encode("\n")
        answers = []
        for q_ids, ranges in qa:
            answers += [(len(ids) + a, len(ids) + e) for a, e in ranges]
            ids += q_ids + nl
        return ids, answers


def build_samples(tokenizer, filler_tokens: np.ndarray, *, lengths: Sequence[int], depths: Sequence[float],
                  samples: int, tasks: Sequence[str] = TASKS, seed: int = 0) -> List[Sample]:
    """Every (task, length, depth, index) sample, deterministic in seed. filler_tokens: int32 (N,)
    tokens of held-out code (the test split)."""
    b = _Builder(tokenizer, np.asarray(filler_tokens), seed)
    return [b.build(t, L, d, i) for t in tasks for L in lengths for d in depths for i in range(samples)]


def _answer_stats(m, ids: List[int], answers: List[Tuple[int, int]], device, autocast_dtype) -> Tuple[float, float]:
    """(fraction of answers exactly predicted, mean NLL per answer token) of one prompt."""
    x = torch.tensor(ids, dtype=torch.int64, device=device).view(1, -1)
    with autocast_ctx(torch.device(device), autocast_dtype):
        logits = m(x, compute_kl=False).logits[0]
    rows = torch.cat([torch.arange(a - 1, e - 1, device=device) for a, e in answers])
    target = torch.cat([x[0, a:e] for a, e in answers])
    lg = logits[rows].float()  # only the answer rows: the whole (T, vocab) in fp32 would be GBs at 32K
    nll = torch.nn.functional.cross_entropy(lg, target, reduction="none")
    hit = lg.argmax(-1) == target
    exact, i = [], 0
    for a, e in answers:
        exact.append(bool(hit[i:i + e - a].all()))
        i += e - a
    return sum(exact) / len(exact), float(nll.mean())


def standard_error(xs) -> Optional[float]:
    """Standard error of the mean of xs (sample standard deviation / sqrt(n)); None below two values."""
    xs = list(xs)
    if len(xs) < 2:
        return None
    m = sum(xs) / len(xs)
    return (sum((x - m) ** 2 for x in xs) / (len(xs) - 1) / len(xs)) ** 0.5


@torch.no_grad()
def score_samples(model: torch.nn.Module, samples: Sequence[Sample], *, device,
                  autocast_dtype: Optional[torch.dtype] = None, control: bool = True) -> List[SampleScore]:
    """Per sample: exact match, answer NLL and (control=True) the answer NLL of its control prompt."""
    m = unwrap(model)
    m.eval()
    scores = []
    for s in samples:
        exact, nll = _answer_stats(m, s.ids, s.answers, device, autocast_dtype)
        cnll = _answer_stats(m, s.control_ids, s.control_answers, device, autocast_dtype)[1] if control else None
        scores.append(SampleScore(exact, nll, cnll))
    m.train()
    return scores


def retrieval_eval(model: torch.nn.Module, tokenizer, filler_tokens: np.ndarray, *, lengths: Sequence[int],
                   depths: Sequence[float], samples: int, device, autocast_dtype: Optional[torch.dtype] = None,
                   tasks: Sequence[str] = TASKS, seed: int = 0) -> Dict[str, object]:
    """Accuracy and fact gain (nats per answer token) by task, length and depth. Returns {"tasks":
    {task: {"by_length": {L: acc}, "by_depth": {d: acc}, "grid": {"L@d": acc}, "mean": acc,
    "gain_by_length": {L: gain}, "gain_se_by_length": {L: standard error of that mean over the
    samples}, "gain_by_depth": {d: gain}, "gain_se_by_depth": {d: its standard error}, "gain_grid":
    {"L@d": gain}, "gain_mean": gain}}, "mean": acc over tasks, "gain_mean": gain over tasks}. With a
    few samples per cell one sample can carry a depth's mean: read the gains with their errors."""
    ss = build_samples(tokenizer, filler_tokens, lengths=lengths, depths=depths, samples=samples, tasks=tasks,
                       seed=seed)
    sc = score_samples(model, ss, device=device, autocast_dtype=autocast_dtype)
    res: Dict[str, object] = {"tasks": {}, "lengths": list(lengths), "depths": list(depths), "samples": samples}

    def mean(xs):
        xs = list(xs)
        return sum(xs) / len(xs) if xs else None
    for t in tasks:
        rows = [(s, v) for s, v in zip(ss, sc) if s.task == t]
        res["tasks"][t] = {
            "by_length": {str(L): mean(v.exact for s, v in rows if s.length == L) for L in lengths},
            "by_depth": {str(d): mean(v.exact for s, v in rows if s.depth == d) for d in depths},
            "grid": {f"{L}@{d}": mean(v.exact for s, v in rows if s.length == L and s.depth == d)
                     for L in lengths for d in depths},
            "mean": mean(v.exact for _, v in rows),
            "gain_by_length": {str(L): mean(v.gain for s, v in rows if s.length == L) for L in lengths},
            "gain_se_by_length": {str(L): standard_error(v.gain for s, v in rows if s.length == L and v.gain is not None)
                                  for L in lengths},
            "gain_by_depth": {str(d): mean(v.gain for s, v in rows if s.depth == d) for d in depths},
            "gain_se_by_depth": {str(d): standard_error(v.gain for s, v in rows if s.depth == d and v.gain is not None)
                                 for d in depths},
            "gain_grid": {f"{L}@{d}": mean(v.gain for s, v in rows if s.length == L and s.depth == d)
                          for L in lengths for d in depths},
            "gain_mean": mean(v.gain for _, v in rows)}
    res["mean"] = mean(v["mean"] for v in res["tasks"].values() if v["mean"] is not None)
    res["gain_mean"] = mean(v["gain_mean"] for v in res["tasks"].values() if v["gain_mean"] is not None)
    return res
