"""msa.evals: loss by position bucket, synthetic retrieval scoring, indexer recall and per-layer KL."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from msa.data.tokenizer import ByteTokenizer
from msa.evals.indexer import recall_eval
from msa.evals.lm import bucket_edges, eval_loss, position_bucket_loss
from msa.evals.retrieval import COPY_MIN_TOKENS, TASKS, build_samples, retrieval_eval, score_samples, standard_error
from msa.metrics import indexer_recall
from msa.ops.select_blocks import select_blocks
from msa.train.trainer import Trainer

from ..train.common import one_thread, tiny_config


@pytest.fixture(autouse=True)
def _threads():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def trained():
    with one_thread():
        tr = Trainer(tiny_config("eval.final=false", "eval.every=0"), "/tmp/unused-evals", progress=False,
                     resume=False)
        for _ in range(6):
            tr.train_step()
        tr.model.set_mode("sparse")
    return tr


def test_bucket_edges():
    assert bucket_edges(16384) == [0, 1024, 2048, 4096, 8192, 16384]
    assert bucket_edges(12000) == [0, 1024, 2048, 4096, 8192, 12000]
    assert bucket_edges(512) == [0, 512]
    assert bucket_edges(100, first=16) == [0, 16, 32, 64, 100]


def test_position_bucket_loss_matches_direct_computation(trained):
    d = trained.data
    toks = d.corpus.splits["test"].tokens
    ids = [w for w in d.test_ids if d.test_windows.single[w]][:2]
    edges = [0, 16, 48, 128]
    res = position_bucket_loss(trained.model, toks, d.test_windows, ids, device="cpu", edges=edges)
    nll = []
    for w in ids:
        s, _ = d.test_windows.pieces(w)
        x = torch.from_numpy(toks[s[0]:s[0] + 128].astype(np.int64)).view(1, -1)
        with torch.no_grad():
            lg = trained.model(x, compute_kl=False).logits[0, :-1]
        nll.append(F.cross_entropy(lg, x[0, 1:], reduction="none"))
    nll = torch.stack(nll)
    for b, (lo, hi) in zip(res["buckets"], zip(edges[:-1], edges[1:])):
        sel = nll[:, lo:min(hi, 127)]
        assert b["tokens"] == sel.numel()
        assert b["loss"] == pytest.approx(float(sel.mean()), rel=1e-5)
    assert res["windows"] == len(ids)


def test_eval_loss_reports_each_msa_layer(trained):
    d = trained.data
    r = eval_loss(trained.model, d.corpus.splits["val"].tokens, d.val_windows, d.val_ids[:1], device="cpu")
    assert set(r["val_layer_kl"]) == {"1"} and r["val_kl"] == pytest.approx(r["val_layer_kl"]["1"])
    assert r["val_kl"] > 0 and 0 < r["val_lm_loss"] < 10


def test_recall_eval_matches_the_metric(trained):
    d = trained.data
    toks = d.corpus.splits["val"].tokens
    w = d.val_ids[0]
    r = recall_eval(trained.model, toks, d.val_windows, [w], device="cpu")
    from msa.data import pack_windows
    b = pack_windows(toks, d.val_windows, [w])
    attn = trained.model.layers[1].attn
    cap = []
    h = attn.register_forward_pre_hook(lambda m, a, kw: cap.append(a[0]), with_kwargs=True)
    with torch.no_grad():
        trained.model(b.input_ids, cu_seqlens=b.cu_seqlens, compute_kl=False)
    h.remove()
    from msa.ops.common import positions_in_sequence
    pos = positions_in_sequence(b.input_ids.shape[1], b.cu_seqlens, "cpu").view(1, -1)
    with torch.no_grad():
        q, k, _, qi, ki = attn.project(cap[0], pos)
    c = attn.config
    sel = select_blocks(qi, ki, block_size=c.block_size, topk=c.topk_blocks, cu_seqlens=b.cu_seqlens)
    want = indexer_recall(q, k, sel, block_size=c.block_size, cu_seqlens=b.cu_seqlens)
    assert r["layer_block_recall"]["1"] == pytest.approx(want["block_recall"])
    assert r["layer_score_recall"]["1"] == pytest.approx(want["score_recall"])


class _Oracle(nn.Module):
    """Logits that put all mass on the true next token of a fixed sequence (or on token 0)."""

    def __init__(self, vocab, right=True):
        super().__init__()
        self.vocab, self.right = vocab, right

    def forward(self, ids, compute_kl=False, **kw):
        lg = torch.zeros(1, ids.shape[1], self.vocab)
        if self.right:
            lg[0, torch.arange(ids.shape[1] - 1), ids[0, 1:]] = 10.0
        return type("Out", (), {"logits": lg})()


def test_retrieval_samples_and_scoring():
    tok = ByteTokenizer()
    code = "".join(f"def fn_{i}(x):\n    return x * {i}\n" for i in range(2000)).encode()
    filler = np.frombuffer(code, dtype=np.uint8).astype(np.int32)
    ss = build_samples(tok, filler, lengths=[1500, 3000], depths=[0.2, 0.8], samples=2, seed=3)
    assert len(ss) == len(TASKS) * 2 * 2 * 2
    again = build_samples(tok, filler, lengths=[1500, 3000], depths=[0.2, 0.8], samples=2, seed=3)
    assert [s.ids for s in ss] == [s.ids for s in again]      # deterministic
    for s in ss:
        assert s.length - 64 <= len(s.ids) <= s.length
        text = tok.decode(s.ids)
        if s.task == "copy":
            continue  # test_copy_span_is_repeated_at_the_end
        for a, e in s.answers:
            ans = tok.decode(s.ids[a:e]).strip()
            assert ans.isdigit() and len(ans) == 5
            prompt = tok.decode(s.ids[:a])
            name = prompt.rsplit("assert ", 1)[1].split(" ==")[0]
            if s.task == "var_track":
                assert f"{name} = " in text[:a]
            else:
                line = f"{name} = {ans}\n"
                pos = text.index(line)
                assert pos < len(prompt) - 20
                if s.task == "needle":
                    assert abs(pos / len(text) - s.depth) < 0.1
        if s.task == "mqar":
            assert len(s.answers) == 8
    assert [x.exact for x in score_samples(_Oracle(256), ss, device="cpu")] == [1.0] * len(ss)
    assert [x.exact for x in score_samples(_Oracle(256, right=False), ss, device="cpu")] == [0.0] * len(ss)


class _Reader(nn.Module):
    """Right about every next token (logit 10) in the prompts it was given, uniform elsewhere: a model
    that 'reads the fact' exactly when the fact is in its input."""

    def __init__(self, vocab, prompts):
        super().__init__()
        self.vocab, self.prompts = vocab, {tuple(p) for p in prompts}

    def forward(self, ids, compute_kl=False, **kw):
        lg = torch.zeros(1, ids.shape[1], self.vocab)
        if tuple(ids[0].tolist()) in self.prompts:
            lg[0, torch.arange(ids.shape[1] - 1), ids[0, 1:]] = 10.0
        return type("Out", (), {"logits": lg})()


def _filler(n=2000):
    code = "".join(f"def fn_{i}(x):\n    return x * {i}\n" for i in range(n)).encode()
    return np.frombuffer(code, dtype=np.uint8).astype(np.int32)


def test_retrieval_control_drops_only_the_asked_values():
    """The control prompt is the prompt without the lines holding the asked values: the same text
    otherwise (distractor needles and the assignment chain stay), the same questions and answers."""
    tok = ByteTokenizer()
    ss = build_samples(tok, _filler(), lengths=[1500, 3000], depths=[0.2, 0.8], samples=2, seed=5)
    for s in ss:
        text, ctext = tok.decode(s.ids), tok.decode(s.control_ids)
        answers = [tok.decode(s.ids[a:e]) for a, e in s.answers]
        assert [tok.decode(s.control_ids[a:e]) for a, e in s.control_answers] == answers
        if s.task == "copy":
            continue  # test_copy_span_is_repeated_at_the_end
        asked = [tok.decode(s.ids[:a]).rsplit("assert ", 1)[1].split(" ==")[0] for a, _ in s.answers]
        if s.task == "var_track":
            # the value line is the only line holding the value; the chain "b = a" ... stays
            removed = [ln for ln in text.split("\n") if ln.endswith(" =" + answers[0]) and not ln.startswith("assert")]
        else:
            removed = [f"{n} ={v}" for n, v in zip(asked, answers)]
        assert len(removed) == len(s.answers) and all(r in text for r in removed)
        assert not any(r in ctext for r in removed)
        rebuilt = text
        for r in removed:
            rebuilt = rebuilt.replace(r + "\n", "", 1)
        assert rebuilt == ctext
        if s.task == "multi_needle":   # the three distractor needles stay in the control
            assert sum(1 for ln in ctext.split("\n") if ln[:1].isupper() and " = " in ln) == 3


def test_copy_span_is_repeated_at_the_end():
    """copy: the span (>= 3 lines of >= 3 tokens, >= COPY_MIN_TOKENS tokens) sits at its depth and again
    at the end; the answers are the repeat's lines after the first, each a whole line; the control is
    the prompt without the first occurrence, so the span appears there once, at the end."""
    tok = ByteTokenizer()
    code = "".join(f"def fn_{i}(x):\n    return x * {i}\n\n" for i in range(2000)).encode()  # blank lines too
    filler = np.frombuffer(code, dtype=np.uint8).astype(np.int32)
    ss = build_samples(tok, filler, lengths=[1500, 3000], depths=[0.2, 0.8], samples=3, tasks=["copy"], seed=4)
    for s in ss:
        a0, e_last = s.answers[0][0], s.answers[-1][1]
        assert [e for _, e in s.answers[:-1]] == [a for a, _ in s.answers[1:]]  # consecutive lines
        lines = [tok.decode(s.ids[a:e]) for a, e in s.answers]
        assert len(lines) >= 2 and all(ln.endswith("\n") and ln.count("\n") == 1 and len(ln) >= 4 for ln in lines)
        cue_start = tok.decode(s.ids[:a0]).rindex("\n", 0, len(tok.decode(s.ids[:a0])) - 1) + 1
        span = tok.decode(s.ids[:e_last])[cue_start:]
        assert len(s.ids[:e_last]) - cue_start >= COPY_MIN_TOKENS and span.count("\n") >= 3
        text, ctext = tok.decode(s.ids), tok.decode(s.control_ids)
        first = text.index(span)
        assert first < cue_start and abs(first / len(text) - s.depth) < 0.1
        assert ctext.count(span) == 1 and ctext.index(span) > len(ctext) - len(span) - 2
        assert text.replace(span, "", 1) == ctext
        assert [tok.decode(s.control_ids[a:e]) for a, e in s.control_answers] == lines


def test_copy_span_skips_windows_inside_one_long_line():
    """A test split that is mostly one long line (a data literal, minified code) with a little ordinary
    code: most random windows hold no whole line, so the builder draws more windows (a run on the GPU
    corpus failed there before); the span comes from the code, and a split with no code at all gets an
    error that says so."""
    tok = ByteTokenizer()
    code = "".join(f"def fn_{i}(x):\n    return x * {i}\n" for i in range(120))
    text = ("x" * 15000 + "\n" + code + "y" * 15000).encode()
    filler = np.frombuffer(text, dtype=np.uint8).astype(np.int32)
    ss = build_samples(tok, filler, lengths=[1500], depths=[0.3, 0.7], samples=4, tasks=["copy"], seed=1)
    for s in ss:
        lines = [tok.decode(s.ids[a:e]) for a, e in s.answers]
        assert lines and all(ln.startswith(("def fn_", "    return x * ")) for ln in lines)
    flat = np.frombuffer(("z" * 40000).encode(), dtype=np.uint8).astype(np.int32)
    with pytest.raises(ValueError, match="copy span"):
        build_samples(tok, flat, lengths=[1500], depths=[0.5], samples=1, tasks=["copy"], seed=1)


def test_fact_gain_is_control_nll_minus_nll():
    """A model right exactly on the real prompts: nll = CE of a logit-10 one-hot, control nll =
    log(vocab) (uniform), gain their difference; exact 1; aggregated per task and length."""
    tok = ByteTokenizer()
    ss = build_samples(tok, _filler(), lengths=[1500], depths=[0.5], samples=1, seed=2)
    sc = score_samples(_Reader(256, [s.ids for s in ss]), ss, device="cpu")
    right = float(np.log(np.exp(10.0) + 255) - 10.0)
    for x in sc:
        assert x.exact == 1.0
        assert x.nll == pytest.approx(right, abs=1e-6)
        assert x.control_nll == pytest.approx(float(np.log(256)), rel=1e-5)
        assert x.gain == pytest.approx(np.log(256) - right, abs=1e-5)
    # a model that reads the control as well as the prompt gains nothing
    both = score_samples(_Reader(256, [s.ids for s in ss] + [s.control_ids for s in ss]), ss, device="cpu")
    assert all(abs(x.gain) < 1e-6 for x in both)
    assert all(x.control_nll is None and x.gain is None for x in
               score_samples(_Oracle(256), ss, device="cpu", control=False))
    res = retrieval_eval(_Reader(256, [s.ids for s in ss]), tok, _filler(), lengths=[1500], depths=[0.5],
                         samples=1, device="cpu", seed=2)
    for t in TASKS:
        assert res["tasks"][t]["mean"] == 1.0
        assert res["tasks"][t]["gain_by_length"]["1500"] == pytest.approx(np.log(256) - right, abs=1e-5)
    assert res["gain_mean"] == pytest.approx(np.log(256) - right, abs=1e-5)
    assert res["tasks"]["needle"]["gain_se_by_length"]["1500"] is None      # one sample: no error bar
    # per depth and per cell: a model that reads only the depth-0.5 prompts gains only there
    ss2 = build_samples(tok, _filler(), lengths=[1500], depths=[0.1, 0.5], samples=2, tasks=["needle"], seed=2)
    res2 = retrieval_eval(_Reader(256, [s.ids for s in ss2 if s.depth == 0.5]), tok, _filler(), lengths=[1500],
                          depths=[0.1, 0.5], samples=2, device="cpu", tasks=["needle"], seed=2)
    nd = res2["tasks"]["needle"]
    assert nd["gain_grid"]["1500@0.5"] == pytest.approx(np.log(256) - right, abs=1e-5)
    assert nd["gain_grid"]["1500@0.1"] == pytest.approx(0.0, abs=1e-5)
    assert nd["gain_by_depth"]["0.5"] == pytest.approx(np.log(256) - right, abs=1e-5)
    assert nd["gain_se_by_depth"]["0.5"] == pytest.approx(0.0, abs=1e-5)
    xs = [0.3, -0.1, 0.7, 0.25]
    assert standard_error(xs) == pytest.approx(float(np.std(xs, ddof=1) / np.sqrt(4)), rel=1e-12)


class _Copier(nn.Module):
    """Logit `strength` on the token one period back (the period: half the prompt), uniform elsewhere: a
    model with perfect induction on the repeat and none on the first occurrence."""

    def __init__(self, vocab, strength=10.0):
        super().__init__()
        self.vocab, self.strength = vocab, strength

    def forward(self, ids, compute_kl=False, **kw):
        t = ids.shape[1]
        lg = torch.zeros(1, t, self.vocab)
        rows = torch.arange(t // 2 - 1, t - 1)               # row r predicts r + 1, a copy of r + 1 - t / 2
        lg[0, rows, ids[0, rows + 1 - t // 2]] = self.strength
        return type("Out", (), {"logits": lg})()


def test_induction_scores_copying_on_the_repeat_only():
    from msa.evals.induction import induction_eval, induction_periods
    assert induction_periods(16384) == [256, 8192] and induction_periods(128) == [64] and induction_periods(4) == [2]
    v = 300
    res = induction_eval(_Copier(v), v, seq_len=1024, samples=3, device="cpu", seed=1)
    assert set(res) == {"256", "512"}
    hit_nll = float(np.log(np.exp(10.0) + v - 1) - 10.0)          # CE of a logit-10 one-hot
    for r in res.values():
        assert r["first_nll"] == pytest.approx(np.log(v), rel=1e-6)    # uniform on the first occurrence
        assert r["second_nll"] == pytest.approx(hit_nll, abs=1e-5) and r["second_acc"] == 1.0
        assert r["gain"] == pytest.approx(np.log(v) - hit_nll, abs=1e-5)
    for kw, name in ((dict(seq_len=3, samples=1), "seq_len"), (dict(seq_len=64, samples=0), "samples")):
        with pytest.raises(ValueError, match=name):
            induction_eval(_Copier(v), v, device="cpu", **kw)
    # no induction: the repeat costs what the first occurrence does, and the argmax (token 0) is right only by chance
    flat = induction_eval(_Copier(v, strength=0.0), v, seq_len=1024, samples=3, device="cpu", seed=1)
    assert all(abs(r["gain"]) < 1e-6 and r["second_acc"] < 0.02 for r in flat.values())


def test_trainer_runs_the_induction_test_unless_switched_off(trained):
    """Every evaluation carries the induction test of the trained model (equal to calling it directly);
    eval.induction_samples=0 switches it off, and a negative count is refused by name."""
    from msa.evals.induction import induction_eval
    res = trained.evaluate()
    want = induction_eval(trained.model, trained.tokenizer.vocab_size, seq_len=trained.cfg.data.seq_len,
                          samples=trained.cfg.eval.induction_samples, device="cpu", seed=trained.cfg.eval.seed)
    assert res["induction"] == want
    trained.cfg.eval.induction_samples = 0
    try:
        assert "induction" not in trained.evaluate()
    finally:
        trained.cfg.eval.induction_samples = 4
    with pytest.raises(ValueError, match="eval.induction_samples"):
        tiny_config("eval.induction_samples=-1")
