"""msa train under data parallelism on 2 gloo ranks (CPU): DDP and FSDP2 steps equal one process on
the same global batch (losses, KL, per-group gradient norms, evaluation, weights), the ranks never
read the same window, checkpoints move between 1 and 2 ranks (DCP <-> one-process files) and
continue the uninterrupted run, and the torchrun-style launch of ``msa train`` writes its files once."""

from __future__ import annotations

import functools
import json
import os
import shutil
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from msa.cli import main
from msa.train.trainer import Trainer, latest_checkpoint
from tests.parallel.dist_utils import run_ranks, start_method

from .common import one_thread, tiny_config

STEPS = 4
# two phases (dense warmup with the KL, then sparse), two micro-batches per step, clipping active in
# both parameter groups, one evaluation at the end; a global micro-batch of 4 windows. The index
# projections start large (std 0.5) so that block scores are far apart: the top-k selection is
# discontinuous, and near-tied scores could swap a block on a last-bit difference of the reductions.
COMMON = ("model.index_init_std=0.5", "steps=4", "phase.warmup_steps=2", "optim.warmup_steps=1", "grad_accum=2", "optim.grad_clip=1e-4",
          "checkpoint_every=2", "keep_checkpoints=3", "eval.every=4", "eval.final=false", "eval.batches=1",
          "log_every=1")
ONE = ("data.batch_size=4",)
TWO = ("data.batch_size=2",)


def _uneven_seed() -> str:
    """A seed whose window order gives the two ranks different numbers of targets in a micro-batch
    (a window holding a document boundary has one target less), so that weighting each rank's token
    mean by its share of the targets is needed for the equality with one process (found at run time:
    almost every window of the tiny corpus is inside one document)."""
    import numpy as np
    from msa.train.trainer import build_data
    d = build_data(tiny_config(*COMMON, *ONE), torch.device("cpu"), log=lambda *a: None)
    w = d.train.windows
    for seed in range(2000):
        perm = np.random.Generator(np.random.PCG64([seed, 0])).permutation(len(w))
        pieces = [len(w.pieces(int(i))[0]) for i in perm[:STEPS * 2 * 4]]
        if any(sum(pieces[j:j + 2]) != sum(pieces[j + 2:j + 4]) for j in range(0, len(pieces), 4)):
            return f"seed={seed}"
    raise AssertionError("no seed in 2000 puts a document boundary into the first micro-batches")


@pytest.fixture(autouse=True)
def _threads():
    with one_thread():
        yield


@functools.lru_cache(maxsize=None)
def _common():
    return (*COMMON, _uneven_seed())


def _full_state(trainer):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    if trainer.strategy == "none":
        return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    return get_model_state_dict(trainer.model, options=StateDictOptions(full_state_dict=True))


def _worker(rank, world, out, jobs):
    """Run each (name, overrides, stop_at_step) job on this rank; rank 0 saves history and weights,
    every rank the windows it read."""
    for name, overrides, stop in jobs:
        t = Trainer(tiny_config(*_common(), *overrides), f"{out}/{name}", progress=False)
        seen = []
        nxt = t.data.train.next

        def record(_nxt=nxt, _seen=seen):
            b = _nxt()
            _seen.append(list(b.windows))
            return b
        t.data.train.next = record
        t.fit(stop_at_step=stop)
        state = _full_state(t)
        Path(f"{out}/{name}.windows{rank}.json").write_text(json.dumps(seen))
        if rank == 0:
            Path(f"{out}/{name}.history.json").write_text(json.dumps(t.history))
            torch.save(state, f"{out}/{name}.weights.pt")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted one-process run on the global batch (checkpoints at steps 2 and 4)."""
    out = tmp_path_factory.mktemp("ref")
    with one_thread():
        t = Trainer(tiny_config(*_common(), *ONE), str(out / "run"), progress=False)
        seen = []
        nxt = t.data.train.next

        def record():
            b = nxt()
            seen.append(list(b.windows))
            return b
        t.data.train.next = record
        t.fit()
    return {"dir": out / "run", "history": t.history, "windows": seen, "weights": _full_state(t)}


def _assert_same_run(hist, ref_hist, first_step=1, rel=1e-5):
    ref = {r["step"]: r for r in ref_hist}
    steps = [r["step"] for r in hist if r["step"] >= first_step]
    assert steps == list(range(first_step, STEPS + 1))
    for r in hist:
        if r["step"] < first_step:
            continue
        e = ref[r["step"]]
        assert r["mode"] == e["mode"]
        for k in ("lm_loss", "kl", "grad_norm", "index_grad_norm", "val_lm_loss", "val_kl", "block_recall"):
            assert (k in r) == (k in e), k
            if k in e:
                assert r[k] == pytest.approx(e[k], rel=rel, abs=1e-6), (r["step"], k)
        assert r["layer_kl"].keys() == e["layer_kl"].keys()
        assert r["tokens"] == e["tokens"]
    # clipping really happened in both groups (so the per-group clip is what is being compared)
    assert all(r["grad_norm"] > 1e-4 and r["index_grad_norm"] > 1e-4 for r in hist)
    assert {r["mode"] for r in ref_hist} == {"dense", "sparse"}


def _assert_same_weights(state, ref_state, atol=2e-5):
    assert state.keys() == ref_state.keys()
    for k in ref_state:
        torch.testing.assert_close(state[k], ref_state[k], rtol=1e-4, atol=atol, msg=k)


def test_ddp_and_fsdp2_equal_one_process_and_ranks_read_disjoint_windows(tmp_path, reference):
    jobs = [("ddp", (*TWO, "parallel.strategy=ddp"), None), ("fsdp2", (*TWO, "parallel.strategy=fsdp2"), None)]
    run_ranks(2, _worker, str(tmp_path), jobs)
    for name, _, _ in jobs:
        hist = json.loads((tmp_path / f"{name}.history.json").read_text())
        _assert_same_run(hist, reference["history"])
        _assert_same_weights(torch.load(tmp_path / f"{name}.weights.pt"), reference["weights"])
        w0 = json.loads((tmp_path / f"{name}.windows0.json").read_text())
        w1 = json.loads((tmp_path / f"{name}.windows1.json").read_text())
        assert len(w0) == len(w1) == len(reference["windows"]) == STEPS * 2
        for a, b, ref in zip(w0, w1, reference["windows"]):
            assert not set(a) & set(b)              # the ranks of a micro-batch never share a window
            assert a + b == ref                     # together they are the one-process micro-batch
        flat = [w for mb in w0 + w1 for w in mb]
        assert len(flat) == len(set(flat))          # nor do they repeat one within the run (one epoch)
        # a data-parallel checkpoint is a torch.distributed.checkpoint directory
        ck = latest_checkpoint(tmp_path / name)
        assert ck.is_dir() and ck.name == f"step_{STEPS:08d}" and (ck / ".metadata").exists()
        log = [json.loads(x) for x in (tmp_path / name / "log.jsonl").read_text().splitlines()]
        assert [r["step"] for r in log] == list(range(1, STEPS + 1))   # written once, by rank 0


def test_checkpoints_move_between_one_and_two_ranks(tmp_path, reference):
    # 1 -> 2: the one-process run's step-2 checkpoint (a .pt file) continued by DDP and by FSDP2 on 2 ranks
    for name in ("one_to_ddp", "one_to_fsdp2"):
        (tmp_path / name / "checkpoints").mkdir(parents=True)
        shutil.copy(reference["dir"] / "checkpoints" / "step_00000002.pt", tmp_path / name / "checkpoints")
    jobs = [("one_to_ddp", (*TWO, "parallel.strategy=ddp"), None),
            ("one_to_fsdp2", (*TWO, "parallel.strategy=fsdp2"), None),
            ("two", (*TWO, "parallel.strategy=fsdp2"), 2)]   # 2 -> 1: FSDP2 on 2 ranks, interrupted at 2
    run_ranks(2, _worker, str(tmp_path), jobs)
    for name in ("one_to_ddp", "one_to_fsdp2"):
        hist = json.loads((tmp_path / f"{name}.history.json").read_text())
        _assert_same_run(hist, reference["history"], first_step=3)
        _assert_same_weights(torch.load(tmp_path / f"{name}.weights.pt"), reference["weights"])

    ck = latest_checkpoint(tmp_path / "two")
    assert ck.is_dir() and ck.name == "step_00000002"
    with pytest.raises(ValueError, match="data.batch_size=4"):   # the global micro-batch must not change
        Trainer(tiny_config(*_common(), *TWO), str(tmp_path / "two"), progress=False)
    t = Trainer(tiny_config(*_common(), *ONE), str(tmp_path / "two"), progress=False)   # one process, no group
    assert t.step == 2
    t.fit()
    _assert_same_run(t.history, reference["history"])
    _assert_same_weights(_full_state(t), reference["weights"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cli_entry(rank, world, port, argv, out):
    # what torchrun --standalone --nproc_per_node=2 gives each process
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), TRITON_INTERPRET="1")
    torch.set_num_threads(1)
    rc = main(argv)
    Path(f"{out}/rc{rank}").write_text(str(rc))


def test_cli_under_torchrun_environment(tmp_path, reference, monkeypatch, capsys):
    from .common import CACHE
    run = tmp_path / "cli"
    sets = [f"data.cache_dir={CACHE}", *_common(), *TWO, "parallel.strategy=fsdp2"]
    argv = ["train", "--preset", "tiny", "--out", str(run), "--no-progress"]
    for s in sets:
        argv += ["--set", s]
    mp.start_processes(_cli_entry, args=(2, _free_port(), argv, str(tmp_path)), nprocs=2, join=True,
                       start_method=start_method())
    assert [(tmp_path / f"rc{r}").read_text() for r in range(2)] == ["0", "0"]
    log = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    _assert_same_run(log, reference["history"])
    info = json.loads((run / "config.json").read_text())
    assert info["world_size"] == 2 and info["config"]["parallel"]["strategy"] == "fsdp2"
    # several ranks for a one-process configuration is an error that says what to set
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["train", "--preset", "tiny", "--out", str(tmp_path / "x")]) == 2
    assert "parallel.strategy=ddp" in capsys.readouterr().err


def test_bf16_mixed_precision_ddp_and_fsdp2(tmp_path, reference):
    """precision=bf16: DDP autocasts like one process; FSDP2 computes with bf16 parameters and
    reduces in fp32. Both stay within bf16 tolerance of the one-process bf16 run, and really compute
    in 16 bits (they move away from the fp32 run by more than fp32 rounding)."""
    bf16 = ("precision=bf16",)
    with one_thread():
        ref = Trainer(tiny_config(*_common(), *ONE, *bf16), str(tmp_path / "ref"), progress=False)
        ref.fit(stop_at_step=2)
    jobs = [("ddp", (*TWO, *bf16, "parallel.strategy=ddp"), 2), ("fsdp2", (*TWO, *bf16, "parallel.strategy=fsdp2"), 2)]
    run_ranks(2, _worker, str(tmp_path), jobs)
    fp32 = {r["step"]: r["lm_loss"] for r in reference["history"]}
    for name, _, _ in jobs:
        hist = json.loads((tmp_path / f"{name}.history.json").read_text())
        assert [r["step"] for r in hist] == [1, 2]
        for r, e in zip(hist, ref.history):
            assert r["lm_loss"] == pytest.approx(e["lm_loss"], rel=2e-3)
            assert r["grad_norm"] == pytest.approx(e["grad_norm"], rel=5e-2)
            assert r["index_grad_norm"] == pytest.approx(e["index_grad_norm"], rel=5e-2)
            assert abs(r["lm_loss"] - fp32[r["step"]]) > 1e-5
