#!/usr/bin/env bash
# One device-machine session: install carried wheels, check kernels and the engine on the GPU,
# then time the suite. Logs land in $OUT (the device tool brings them back).
source "$(dirname "$0")/device_env.sh"
nvidia-smi --query-gpu=memory.total,driver_version --format=csv,noheader
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
git rev-parse --short HEAD 2>/dev/null || true
stage=${1:-all}
if [ "$stage" = all ] || [ "$stage" = check ]; then
  echo "=== kernels vs references on GPU"
  timeout 180 python3 benchmarks/kernels/check_gpu.py 2>&1 | tee "$OUT/check_gpu.txt" | tail -25
  echo "=== pytest on GPU (kernels, attention, engine, equivalence)"
  timeout 300 python3 -m pytest -q -x -p no:cacheprovider tests/kernels tests/attention tests/engine \
    tests/models/test_equivalence.py tests/core 2>&1 | tee "$OUT/pytest_gpu.txt" | tail -25
fi
if [ "$stage" = all ] || [ "$stage" = bench ]; then
  echo "=== K1 attention kernels"
  timeout 150 python3 benchmarks/kernels/bench_attention.py --quick 2>&1 | tee "$OUT/k1.txt" | tail -40
  echo "=== suite"
  timeout 420 python3 benchmarks/gpu_suite.py --quick ${SUITE_ARGS:-} 2>&1 | tee "$OUT/suite.txt" | tail -40
fi
