"""GPU benchmarks shipped with the package, run as ``msa bench NAME [args]`` or
``python -m msa.bench.NAME [args]`` (each writes JSON and plots under ``--out DIR``).

Every benchmark needs a CUDA GPU and Triton; each starts with a correctness gate against the
PyTorch reference. Committed results live in the source repository's ``benchmarks/results/``.
"""

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

__all__ = ["BENCHES"]
