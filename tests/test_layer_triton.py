"""MSAAttention and the LM with backend="triton" (GPU, or the interpreter on CPU) against backend="reference":
forward, KL and every parameter gradient, in both modes, and one optimizer step end to end."""

import pytest
import torch

from msa.layers import MSAAttention, MSAConfig
from msa.models import MSAForCausalLM, MSALMConfig

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def cfg(backend, **kw):
    base = dict(hidden_size=64, num_heads=6, num_kv_heads=2, head_dim=16, index_dim=16, block_size=16, topk_blocks=3,
                backend=backend)
    base.update(kw)
    return MSAConfig(**base)


def rel(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-6))


@pytest.mark.parametrize("mode", ["sparse", "dense"])
def test_layer_triton_matches_reference(mode):
    torch.manual_seed(0)
    ref = MSAAttention(cfg("reference", mode=mode)).to(DEV)
    tri = MSAAttention(cfg("triton", mode=mode)).to(DEV)
    tri.load_state_dict(ref.state_dict())
    x = torch.randn(1, 100, 64, device=DEV)
    cu = torch.tensor([0, 37, 100], dtype=torch.int32, device=DEV)  # packed, partial blocks adjacent
    outs = []
    for m in (ref, tri):
        m.train()
        out = m(x, cu_seqlens=cu)
        (out.hidden.square().mean() + out.kl_loss).backward()
        outs.append(out)
    if mode == "sparse":
        # the convention leaves the order of the non-local ids free: compare sorted rows
        assert torch.equal(outs[0].block_indices.sort(-1).values, outs[1].block_indices.sort(-1).values)
        assert torch.equal(outs[0].block_indices[..., -1], outs[1].block_indices[..., -1])
    assert rel(outs[1].hidden, outs[0].hidden) < 1e-4
    assert abs(float(outs[1].kl_loss) - float(outs[0].kl_loss)) <= 1e-4 * max(1.0, abs(float(outs[0].kl_loss)))
    for (name, p_ref), (_, p_tri) in zip(ref.named_parameters(), tri.named_parameters()):
        assert p_tri.grad is not None, name
        assert rel(p_tri.grad, p_ref.grad) < 1e-3, f"{name}: {rel(p_tri.grad, p_ref.grad):.2e}"


def test_model_trains_with_triton_backend():
    torch.manual_seed(1)
    make = lambda b: MSAForCausalLM(MSALMConfig(vocab_size=64, num_layers=2, intermediate_size=64,  # noqa: E731
                                                attention=cfg(b), num_dense_layers=0)).to(DEV)
    ref, tri = make("reference"), make("triton")
    tri.load_state_dict(ref.state_dict())
    ids = torch.randint(0, 64, (2, 80), device=DEV)
    opt_r = torch.optim.SGD(ref.parameters(), lr=0.1)
    opt_t = torch.optim.SGD(tri.parameters(), lr=0.1)
    lr_, lt_ = ref.training_step(ids, opt_r), tri.training_step(ids, opt_t)
    for key in ("loss", "lm_loss", "kl_loss"):
        assert abs(lr_[key] - lt_[key]) <= 1e-4 * max(1.0, abs(lr_[key])), key
    for (name, a), (_, b) in zip(ref.named_parameters(), tri.named_parameters()):
        assert rel(b.detach(), a.detach()) < 1e-4, name  # the same update was applied
