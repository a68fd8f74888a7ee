"""msa train under torchrun on 2 GPUs (NCCL): DDP and FSDP2 (bf16) follow the one-GPU run on the
same global batch within bf16 tolerance, write their files once, and their DCP checkpoint resumes on
one GPU. Skipped without 2 GPUs (the CPU / gloo equivalents are in test_train_distributed.py)."""

import json
import os
import subprocess
import sys

import pytest
import torch

from msa.train.trainer import Trainer, latest_checkpoint

from .common import CACHE
from .test_train_gpu import GPU_OVERRIDES, _cfg

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                                reason="needs 2 GPUs")
SETS = ("eval.final=false", "checkpoint_every=12")


def _torchrun(out, *sets):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "msa.cli",
           "train", "--preset", "tiny", "--out", str(out), "--no-progress"]
    # the same overrides as the one-GPU run (test_train_gpu._cfg), per-rank batch halved
    for s in [*GPU_OVERRIDES, f"data.cache_dir={CACHE}", *SETS, "data.batch_size=1", *sets]:
        cmd += ["--set", s]
    env = dict(os.environ, PYTHONPATH=os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", ""))
    subprocess.run(cmd, check=True, env=env, timeout=600)
    return [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_torchrun_two_gpus_follow_one_gpu(tmp_path, strategy):
    ref = Trainer(_cfg(*SETS), str(tmp_path / "one"), progress=False)   # data.batch_size=2 on one GPU
    ref.fit()
    log = _torchrun(tmp_path / "two", f"parallel.strategy={strategy}")
    assert [r["step"] for r in log] == [r["step"] for r in ref.history]
    for r, e in zip(log, ref.history):
        assert r["mode"] == e["mode"]
        assert r["lm_loss"] == pytest.approx(e["lm_loss"], rel=3e-2, abs=3e-2)
    assert log[-1]["val_lm_loss"] == pytest.approx(ref.history[-1]["val_lm_loss"], rel=3e-2)
    ck = latest_checkpoint(tmp_path / "two")
    assert ck.is_dir()
    # the 2-GPU checkpoint (step 24) loads into one GPU process
    one = Trainer(_cfg(*SETS), str(tmp_path / "two"), progress=False)
    assert one.step == 24
