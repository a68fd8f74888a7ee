"""Test configuration: on a machine without CUDA the Triton kernels run in the interpreter, which
must be switched on before any kernel module is imported."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import contextlib  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture
def tuned():
    """``tuned(field=value, ...)`` applies ``msa.tuning.override`` until the test ends (calls nest)."""
    import msa.tuning
    with contextlib.ExitStack() as stack:
        yield lambda **kw: stack.enter_context(msa.tuning.override(**kw))
