"""``msa.bench.aot_check`` describes every kernel launch of a training step (and the decode chain) by
its arguments; the check itself needs the GPU's Triton, but whether those descriptions still match the
kernels' signatures (an argument added to a kernel and not to the check) is checked here, on any
machine, without compiling: the interpreter must be off for aot_check, hence a subprocess."""

import os
import subprocess
import sys


def test_aot_check_launches_match_kernel_signatures():
    code = ("from msa.bench.aot_check import _launches, _signature\n"
            "labels = [lab for lab, fn, args, consts, nw, ns in _launches() if _signature(fn, args, consts)]\n"
            "print(len(labels)); print('\\n'.join(labels))\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = res.stdout.split("\n")
    labels = lines[1:]
    assert int(lines[0]) == len([x for x in labels if x]) >= 20
    for name in ("sparse_attention_tiled_fwd_kernel", "sparse_attention_bwd_dq_tiled_kernel",
                 "sparse_attention_bwd_dkdv_kernel", "indexer_kl_fwd_kv_heads_kernel", "decode_index_fwd_kernel"):
        assert any(x.startswith(name) for x in labels), name
