#!/usr/bin/env bash
# The GPU checks of issue 5 in one command, for a session that is lent a GPU: the kernel tests
# natively (-m gpu), then `python -m kernels.bench`. Logs and the bench's JSON lines go to OUTDIR.
# Runs from the repo root without installing (the GPU image has torch, triton and pytest):
#     bash benchmarks/gpu_run.sh [OUTDIR] [bench flags, e.g. --quick --no-compile]
set -uo pipefail
out=${1:-benchmarks/results}
shift || true
mkdir -p "$out"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  git rev-parse HEAD 2>/dev/null || true
  date -u +%FT%TZ
} | tee "$out/gpu_env.txt"
timeout 300 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_kernels_*.py \
  2>&1 | tee "$out/gpu_tests.log"
timeout 420 python3 -m kernels.bench --out "$out/bench.jsonl" "$@" 2>&1 | tee "$out/bench.md"
