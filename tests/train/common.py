"""Shared helpers of the training / data / eval tests: the tiny preset on a cached tiny corpus, one
CPU thread (the test machine's few cores are shared; thread oversubscription makes tiny ops slow)."""

import tempfile
from pathlib import Path

import torch

from msa.train import apply_overrides, get_preset

CACHE = str(Path(tempfile.gettempdir()) / "msa-test-data-cache")


def tiny_config(*overrides):
    return apply_overrides(get_preset("tiny"), [f"data.cache_dir={CACHE}", *overrides])


class one_thread:
    def __enter__(self):
        self.n = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc):
        torch.set_num_threads(self.n)
