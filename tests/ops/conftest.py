"""Fixtures shared by the kernel tests."""

import pytest
import torch


@pytest.fixture
def nan_empty(monkeypatch):
    """torch.empty / empty_like return NaN-filled float tensors, so any output element a kernel fails
    to write shows up as NaN in the comparison."""
    orig_empty, orig_like = torch.empty, torch.empty_like

    def fill(t):
        if t.is_floating_point():
            with torch.no_grad():  # torch.utils.checkpoint (2.11) makes torch.empty((0,), requires_grad=True)
                t.fill_(float("nan"))
        return t

    def empty(*args, **kwargs):
        return fill(orig_empty(*args, **kwargs))

    def empty_like(*args, **kwargs):
        return fill(orig_like(*args, **kwargs))

    monkeypatch.setattr(torch, "empty", empty)
    monkeypatch.setattr(torch, "empty_like", empty_like)
