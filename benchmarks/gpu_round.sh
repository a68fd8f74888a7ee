#!/usr/bin/env bash
# One device call: environment, GPU kernel tests, then the named benchmarks (each under a time limit).
# Usage: bash benchmarks/gpu_round.sh "<pytest files>" "<bench names>" [bench args...]
# Writes $OUT/log.txt and $OUT/<bench>/ (JSON + PNG).
set -u
export PYTHONPATH=.
export PYTHONUNBUFFERED=1
TESTS=${1:-}
BENCHES=${2:-}
shift 2 || true
LOG=$OUT/log.txt
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  if [ -n "$TESTS" ]; then
    echo "=== pytest $TESTS"
    timeout ${TEST_TIMEOUT:-180} python3 -m pytest -q -x -p no:cacheprovider $TESTS 2>&1 | tail -40
  fi
  for b in $BENCHES; do
    echo "=== bench $b"
    mkdir -p $OUT/$b
    timeout ${BENCH_TIMEOUT:-150} python3 -m msa.bench.$b --out $OUT/$b "$@" 2>&1 | tail -60
  done
} 2>&1 | tee $LOG
