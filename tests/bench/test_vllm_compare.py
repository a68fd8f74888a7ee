"""benchmarks/vllm_compare.py: the layout conversion, the selection agreement, clear errors for a bad
``--vllm``, and (when vLLM's kernel files are at hand: an installed vllm or the ``.vllm/`` folder the
script's docstring describes) vLLM's kernels against msa's references on small shapes."""

import importlib.util
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def load_script():
    spec = importlib.util.spec_from_file_location("vllm_compare", ROOT / "benchmarks" / "vllm_compare.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def vllm_installed():
    return load_script()._vllm_installed()


def test_ids_layout_and_agreement():
    vc = load_script()
    ours = torch.tensor([[[[0, 2, 5], [1, -1, -1]], [[3, 4, 5], [0, 1, 2]]]], dtype=torch.int32)  # (1, 2, 2, 3)
    ids = vc.to_vllm_ids(ours)
    assert ids.shape == (2, 2, 3) and torch.equal(ids[1, 0], ours[0, 0, 1]) and torch.equal(ids[0, 1], ours[0, 1, 0])
    theirs = ids.clone()
    theirs[0, 0] = torch.tensor([5, 0, 2])  # same set, other order: agrees
    theirs[1, 1] = torch.tensor([2, 1, 7])  # one block of three differs
    rows, recall = vc.selection_agreement(theirs, ids)
    assert rows == pytest.approx(3 / 4)
    assert recall == pytest.approx(9 / 10)  # 10 valid blocks in ids, 9 found


@pytest.mark.skipif(vllm_installed(), reason="an installed vllm is used whatever --vllm says")
def test_bad_vllm_argument_is_named(tmp_path):
    vc = load_script()
    with pytest.raises(SystemExit, match="--vllm"):
        vc.load_vllm_kernels(None)
    with pytest.raises(SystemExit, match="no such file"):
        vc.load_vllm_kernels(str(tmp_path / "missing.whl"))
    (tmp_path / "x.whl").write_text("not a zip")
    with pytest.raises(ValueError, match="wheel"):
        vc.load_vllm_kernels(str(tmp_path / "x.whl"))
    with pytest.raises(ValueError, match="sparse_attn.py"):
        vc.load_vllm_kernels(str(tmp_path))


KERNELS_AT_HAND = vllm_installed() or (ROOT / ".vllm" / "vllm").is_dir()


@pytest.mark.skipif(not KERNELS_AT_HAND, reason="vLLM's kernel files are not here (see benchmarks/vllm_compare.py)")
def test_vllm_kernels_agree_with_msa(monkeypatch):
    """vLLM's index top-k selects msa's sets and its attention on msa's selections matches msa's
    reference (T 300: three blocks, the last partial; G 2). The tiled kernel needs block pointers, which
    triton 3.9's interpreter no longer has: it runs on a GPU only."""
    import msa

    vc = load_script()
    for name, value in dict(HQ=4, HKV=2, D=32, DIDX=32, TOPK=2).items():
        monkeypatch.setattr(vc, name, value)
    mods, _, _ = vc.load_vllm_kernels(str(ROOT / ".vllm"))
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    if dev == "cpu":  # the interpreter takes one autotune config
        kt = mods["vllm.models.minimax_m3.common.ops.index_topk"]._topk_index_kernel.fn
        monkeypatch.setattr(kt, "configs", [c for c in kt.configs if c.kwargs["BLOCK_SIZE_K"] == 128])
    t = 300
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, t, h, 32, generator=g) for h in (4, 2, 2))
    qi, ki = torch.randn(1, t, 2, 32, generator=g), torch.randn(1, t, 32, generator=g)
    # bf16 values; the interpreter's bf16 arithmetic is not the GPU's, so on the CPU they travel as fp32
    dt = torch.bfloat16 if dev == "cuda" else torch.float32
    q, k, v, qi, ki = (x.to(torch.bfloat16).to(dev, dt) for x in (q, k, v, qi, ki))
    side = vc.VllmSide(mods, q, k, v, qi, ki)
    ours = msa.select_blocks(qi.float(), ki.float(), block_size=128, topk=2, backend="reference")
    rows, recall = vc.selection_agreement(side.select(), vc.to_vllm_ids(ours))
    assert rows == 1.0 and recall == 1.0
    o_ref = msa.sparse_attention(q.float(), k.float(), v.float(), ours, block_size=128, scale=32 ** -0.5,
                                 backend="reference")[0]
    for kern in ("qo", "tiled") if dev == "cuda" else ("qo",):
        o = side.attention(vc.to_vllm_ids(ours), kern).float()
        assert (o - o_ref).abs().max().item() <= (2e-2 if dev == "cuda" else 1e-5), kern
