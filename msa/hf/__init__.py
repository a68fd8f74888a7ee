"""msa for Hugging Face transformers: convert Llama / Qwen2 / Qwen3 / Mistral causal LMs to MiniMax Sparse
Attention, train them (``kl_loss``), generate with them, save and reload them, and run MiniMax-M3's sparse
layers (transformers' ``minimax_m3_vl`` text model) through msa's kernels.

Needs ``transformers >= 5.24`` (the package's ``[hf]`` extra); ``import msa`` alone never imports transformers.

Example::

    import torch
    import msa.hf
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained("Qwen/Qwen3-0.6B", dtype=torch.bfloat16).cuda()
    msa.hf.to_msa(model, block_size=128, topk_blocks=16, index_dim=128)     # mode "dense": same logits
    loss = model(ids, labels=ids).loss + msa.hf.kl_loss(model)              # dense warmup trains the indexer
    msa.hf.set_mode(model, "sparse")
    out = model.generate(ids, max_new_tokens=64)
    model.save_pretrained("out"); model = msa.hf.from_pretrained("out")
"""

from __future__ import annotations

MIN_TRANSFORMERS = (5, 24)


def _check_transformers() -> None:
    try:
        import transformers
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ImportError('msa.hf needs transformers >= 5.24: install the package\'s [hf] extra '
                          '(or pip install "transformers>=5.24")') from exc
    parts = []
    for piece in transformers.__version__.split(".")[:2]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    if tuple(parts) < MIN_TRANSFORMERS:  # pragma: no cover - depends on the install
        raise ImportError(f"msa.hf needs transformers >= 5.24, found {transformers.__version__}: "
                          'pip install "transformers>=5.24"')


_check_transformers()

from .cache import MSAHFCache  # noqa: E402
from .convert import (MSASettings, from_pretrained, index_parameters, kl_loss, msa_settings, set_mode,  # noqa: E402
                      to_msa)

__all__ = ["to_msa", "set_mode", "kl_loss", "index_parameters", "from_pretrained", "msa_settings", "MSASettings",
           "MSAHFCache"]
