"""GPU benchmarks shipped with the package, run as ``msa bench NAME [args]`` or
``python -m msa.bench.NAME [args]`` (each writes JSON and plots under ``--out DIR``).

Every benchmark needs a CUDA GPU and Triton; each starts with a correctness gate against the
PyTorch reference. Committed results live in the source repository's ``benchmarks/results/``.
"""

import argparse

#: name -> one-line description, for ``msa bench --help``.
BENCHES = {
    "prefill": "forward of select_blocks + sparse_attention vs dense SDPA / FlexAttention",
    "decode": "decode kernels over a KV + index-key cache vs dense SDPA decode",
    "train": "one layer's training step (sparse and warmup phases) vs dense SDPA",
    "topk": "exp-free top-k and the full indexer vs torch.topk",
    "generate": "generate() ms per token after 32K / 128K prompts (CUDA graph), MSA vs an all-dense twin",
    "hf": "a converted ~1B Llama-shaped transformers model: prefill and generate() with MSA vs sdpa",
    "selections": "record a trained model's block selections (replayed by prefill/train --indices realistic)",
    "layer": "the MSAAttention layer and a 4-layer model's training step (what users call) vs ops and dense",
}


def positive_ints(text: str) -> list:
    """argparse type of comma-separated positive integers (``--sizes 8192,32768``), so a bad list is a
    one-line usage error naming the argument before any GPU work."""
    try:
        vals = [int(s) for s in text.split(",")]
    except ValueError:
        vals = []
    if not vals or min(vals) < 1:
        raise argparse.ArgumentTypeError(f"must be comma-separated positive integers, got {text!r}")
    return vals


__all__ = ["BENCHES", "positive_ints"]
