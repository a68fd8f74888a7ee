"""Is generation on the GPU bitwise repeatable? Seeded sampling and the logits of repeated sessions.

Why: session 48's native suite (H100, session 47's tree) failed once in
``tests/models/test_generation.py::test_cuda_graph_greedy_equals_uncaptured[0]``: two ``generate`` calls with equally
seeded generators (temperature 1, 8 tokens, 3 prompts) differed in one token, the first the captured step drew,
while the tokens after it agreed. A sampler that drew from the wrong place in its stream would change nearly every
token, so the likelier cause is logits that differ in the last bits between the two generations and a near tie in
the sampler's race. The kernels of this path have no atomics and break ties by index, and on the CPU (Triton
interpreter, torch.empty poisoned with NaN or 1e4) the logits do not change at all; on the GPU the candidates are
library choices (cuBLAS may pick another implementation while more than one stream is active, and the graph's
warm-up runs on a side stream) and tiles that differ from the interpreter's. This probe, with the test's model and
prompts, counts sampled generations that differ from the first (captured and not) and prints the largest logit
difference between repeated sessions per step (prefill, then three steps).

    PYTHONPATH=. python benchmarks/dev/sampling_repeat_probe.py [--repeats 12] [--device cuda]
    (on the CPU: TRITON_INTERPRET=1 and --device cpu, fp32, uncaptured only)
"""

from __future__ import annotations

import argparse
import os

import torch

from msa.layers import MSAConfig
from msa.models import MSAForCausalLM, MSALMConfig
from msa.models.generation import GenerationSession


def _model(num_dense_layers: int, dtype: torch.dtype, device: str) -> MSAForCausalLM:
    att = dict(hidden_size=256, num_heads=8, num_kv_heads=2, head_dim=64, index_dim=64, block_size=16, topk_blocks=4,
               init_blocks=0, local_blocks=1, backend="auto" if device == "cuda" else "triton")
    torch.manual_seed(11)
    cfg = MSALMConfig(vocab_size=512, num_layers=3, intermediate_size=64, num_dense_layers=num_dense_layers,
                      attention=MSAConfig(**att))
    return MSAForCausalLM(cfg).to(device=device, dtype=dtype).eval()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=12)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = ap.parse_args()
    dev = a.device
    if a.repeats < 2:
        ap.error("--repeats must be >= 2 (generations are compared with the first)")
    if dev not in ("cuda", "cpu") or (dev == "cuda" and not torch.cuda.is_available()):
        ap.error(f"--device must be cuda (with a GPU) or cpu, got {dev!r}")
    if dev == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        ap.error("--device cpu runs the Triton kernels in the interpreter: set TRITON_INTERPRET=1")
    graphs = (True, False) if dev == "cuda" else (False,)
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    g = torch.Generator().manual_seed(12)
    prompts = [torch.randint(0, 512, (n,), generator=g).to(dev) for n in (37, 300, 129)]
    for nd in (0, 1):
        model = _model(nd, dtype, dev)
        for graph in graphs:
            outs = [torch.cat(model.generate(prompts, 8, temperature=1.0, cuda_graph=graph,
                                             generator=torch.Generator(dev).manual_seed(3)))
                    for _ in range(a.repeats)]
            bad = sum(not torch.equal(o, outs[0]) for o in outs[1:])
            print(f"dense layers {nd}, cuda_graph {graph}: {bad} of {a.repeats - 1} seeded generations differ from "
                  f"the first", flush=True)
            with torch.no_grad():
                runs = []
                for _ in range(min(a.repeats, 6)):
                    s = GenerationSession(model, prompts, 5, cuda_graph=graph, temperature=1.0,
                                          generator=torch.Generator(dev).manual_seed(3))
                    s.prefill()
                    logits = [s.logits.float().clone()]
                    for _ in range(3):
                        s.step()
                        sync()
                        logits.append(s.logits.float().clone())
                    s.close()
                    runs.append(logits)
            diff = [max(float((r[j] - runs[0][j]).abs().max()) for r in runs[1:]) for j in range(4)]
            print(f"dense layers {nd}, cuda_graph {graph}: largest logit difference to the first session, "
                  f"prefill and steps 1-3: {diff}", flush=True)


if __name__ == "__main__":
    main()
