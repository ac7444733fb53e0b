#!/usr/bin/env bash
# The GPU checks of issue 5 in one command of under 9 minutes, for a session lent a GPU (its
# commands may run 10 minutes, its device time is 15): the kernel tests natively (-m gpu, spread
# over 8 processes when pytest-xdist is there), then `python -m kernels.bench`, whose last lines
# judge the issue's targets. Logs and the bench's JSON lines go to OUTDIR. Runs from the repo
# root without installing (the GPU image has torch, triton, pytest and pytest-xdist):
#     bash benchmarks/gpu_run.sh [OUTDIR] [bench flags; default --no-compile --budget-min 4.5]
set -uo pipefail
out=${1:-benchmarks/results}
shift || true
[ $# -gt 0 ] || set -- --no-compile --budget-min 4.5
mkdir -p "$out"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  git rev-parse HEAD 2>/dev/null || true
  date -u +%FT%TZ
} | tee "$out/gpu_env.txt"
workers=$(python3 -c "import xdist" 2>/dev/null && echo "-n 8" || true)
timeout 180 python3 -m pytest -q -m gpu -p no:cacheprovider $workers tests/test_kernels_*.py \
  > "$out/gpu_tests.log" 2>&1
echo "gpu tests: exit $? ($(tail -n 1 "$out/gpu_tests.log"))" | tee -a "$out/gpu_env.txt"
grep -E "^(FAILED|ERROR)" "$out/gpu_tests.log" | head -n 20
timeout 330 python3 -m kernels.bench --out "$out/bench.jsonl" "$@" 2>&1 | tee "$out/bench.md"
