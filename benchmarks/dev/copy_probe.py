"""Does a model trained with ``msa train`` copy? Two probes, and the curricula tried to make it copy.

``check RUN``: on the run's own training-format windows (facts planted as in training), the mean NLL of
the planted answers' tokens (5 random digits: ~2.3 nats per token at chance) and their exact match;
then the induction test: a random token sequence repeated once, loss on each copy (a model that
copies has a much lower loss on the second); then the evaluation's ``copy`` task at the run's context
length, by depth (an msa run in dense and in sparse mode; a local run as itself).

``train --copy-steps N --copy-mix F --copy-period fixed|random --repeat-spans K -- <msa train args>``:
``msa train`` with the training batches changed (dev only; the library has no such option): the first
N steps, and a share F of the later ones, replace every packed document by repeats of random tokens
(a period of a quarter of the document, or a random period in [8, len / 2]); K > 0 copies K spans of
64 tokens of each planted document to a later position of it before the facts go in (the library's
``data.synthetic_copies`` now plants repeated spans without this script).

    python benchmarks/dev/copy_probe.py train --copy-steps 400 --copy-mix 0.2 --copy-period random -- \\
        --preset small --set phase.kind=dense --set phase.kl_weight=0 --set phase.warmup_steps=0 \\
        --set data.synthetic_facts=1.0 --set data.facts_per_window=4 --set steps=1500 --out /tmp/cw
    python benchmarks/dev/copy_probe.py check /tmp/cw

What they showed (CPU, session 25; quality README, round 7): no curriculum made the `small` model
copy the facts within 1000-1500 steps; nor did ``data.synthetic_copies=1.0`` (session 51,
benchmarks/results/quality_cpu/copy_planting.json).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import numpy as np
import torch

ANSWER = re.compile(r"\nassert [A-Za-z]+_[A-Za-z]+ ==( \d{5})\n")


def _logits(model, ids):
    out = model(ids)
    return (out.logits if hasattr(out, "logits") else out[0]).float()


@torch.no_grad()
def check(run: str, windows: int = 8, copy_samples: int = 8) -> dict:
    from msa.train.trainer import build_data, build_model, config_from_run, latest_checkpoint, load_full_model_state
    cfg = config_from_run(run)
    data = build_data(cfg, torch.device("cpu"), log=lambda *a, **k: None)
    tok = data.corpus.tokenizer
    model = build_model(cfg, tok.vocab_size, torch.device("cpu"))
    model.load_state_dict(load_full_model_state(latest_checkpoint(Path(run))))
    model.eval()
    model.set_mode("dense")
    loader = data.train
    from msa.data import FactPlanter
    facts = [pl for pl in loader.planters if isinstance(pl, FactPlanter)]
    nll_sum, n_tok, exact = 0.0, 0, []
    for w in range(windows if facts else 0):   # the planted answers (a run trained with data.synthetic_facts)
        ss, ll = loader.windows.pieces(w)
        pieces, _ = facts[0].apply_counted([loader.tokens[s:s + n] for s, n in zip(ss, ll)], 0, w)
        ids = torch.from_numpy(np.concatenate(pieces).astype(np.int64)).view(1, -1)
        lp = torch.log_softmax(_logits(model, ids)[0, :-1], -1)
        toks = ids[0].tolist()
        offs, text = [], ""
        for t in toks:
            offs.append(len(text))
            text += tok.decode([t])
        for m in ANSWER.finditer(text):
            a, b = m.span(1)
            idx = [i for i, o in enumerate(offs) if a <= o < b and i > 0]
            nll_sum += float(sum(-lp[i - 1, toks[i]] for i in idx))
            n_tok += len(idx)
            exact.append(all(int(lp[i - 1].argmax()) == toks[i] for i in idx))
    g = torch.Generator().manual_seed(0)
    induction = {}
    for length in (16, 64, 200):
        x = torch.randint(300, tok.vocab_size, (1, length), generator=g)
        ids = torch.cat([x, x], 1)
        lp = torch.log_softmax(_logits(model, ids)[0, :-1], -1)
        nll = -lp.gather(1, ids[0, 1:, None])[:, 0]
        induction[length] = (float(nll[:length - 1].mean()), float(nll[length:].mean()))
    from msa.evals.retrieval import retrieval_eval
    modes = {}
    for mode in {"msa": ["dense", "sparse"], "dense": ["dense"], "local": ["sparse"]}[cfg.phase.kind]:
        model.set_mode(mode)
        cp = retrieval_eval(model, tok, data.corpus.splits["test"].tokens, lengths=[cfg.data.seq_len],
                            depths=[0.1, 0.5, 0.9], samples=copy_samples, device="cpu", tasks=["copy"])["tasks"]["copy"]
        modes[mode] = {"accuracy_by_depth": cp["by_depth"], "gain_by_depth": cp["gain_by_depth"], "accuracy": cp["mean"],
                       "gain": cp["gain_mean"]}
    res = {"answer_token_nll": nll_sum / max(1, n_tok), "answer_tokens": n_tok,
           "exact": float(np.mean(exact)) if exact else None, "asks": len(exact),
           "induction_nll_first_second_copy": induction, "copy_task_at_seq_len": modes}
    print(res)
    return res


def train(args, rest) -> int:
    import msa.data.dataset as dataset
    import msa.data.facts as facts
    from msa.cli import main as cli_main

    orig_next, orig_plant = dataset.WindowLoader.next, facts.FactPlanter._plant
    state = {"step": 0}

    def next_batch(self):
        batch = orig_next(self)
        state["step"] += 1
        rng = np.random.default_rng(state["step"])
        if state["step"] <= args.copy_steps or rng.random() < args.copy_mix:
            ids, cu = batch.input_ids.clone(), batch.cu_seqlens.tolist()
            vocab = int(ids.max()) + 1 if args.vocab is None else args.vocab
            for s, e in zip(cu[:-1], cu[1:]):
                n = e - s
                period = max(2, n // 4) if args.copy_period == "fixed" else int(rng.integers(8, max(9, n // 2)))
                seq = torch.from_numpy(rng.integers(100, vocab, size=period))
                ids[0, s:e] = seq.repeat(n // period + 1)[:n]
            batch = dataset.Batch(ids, batch.cu_seqlens, batch.windows)
        return batch

    def plant(self, piece, rng):
        if args.repeat_spans > 0:
            piece = piece.copy()
            r2 = np.random.Generator(np.random.PCG64([self.seed, 999, int(rng.integers(1 << 30))]))
            for _ in range(args.repeat_spans):
                if len(piece) < 3 * 64:
                    break
                p = int(r2.integers(0, len(piece) - 128))
                q = int(r2.integers(p + 64, len(piece) - 64))
                piece[q:q + 64] = piece[p:p + 64]
        return orig_plant(self, piece, rng)

    dataset.WindowLoader.next = next_batch
    facts.FactPlanter._plant = plant
    return cli_main(["train", *rest])


def main() -> int:
    argv = sys.argv[1:]
    rest = []
    if "--" in argv:
        i = argv.index("--")
        argv, rest = argv[:i], argv[i + 1:]
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("check")
    c.add_argument("run")
    t = sub.add_parser("train")
    t.add_argument("--copy-steps", type=int, default=0)
    t.add_argument("--copy-mix", type=float, default=0.0)
    t.add_argument("--copy-period", choices=("fixed", "random"), default="random")
    t.add_argument("--repeat-spans", type=int, default=0)
    t.add_argument("--vocab", type=int, default=2048, help="random tokens are drawn from [100, vocab)")
    args = ap.parse_args(argv)
    if args.cmd == "check":
        check(args.run)
        return 0
    return train(args, rest)


if __name__ == "__main__":
    raise SystemExit(main())
