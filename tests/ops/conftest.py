"""Fixtures shared by the kernel tests."""

import pytest
import torch


@pytest.fixture
def nan_empty(monkeypatch):
    """torch.empty / empty_like return NaN-filled float tensors, so any output element a kernel fails
    to write shows up as NaN in the comparison."""
    orig_empty, orig_like = torch.empty, torch.empty_like

    def empty(*args, **kwargs):
        t = orig_empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    def empty_like(*args, **kwargs):
        t = orig_like(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", empty)
    monkeypatch.setattr(torch, "empty_like", empty_like)
