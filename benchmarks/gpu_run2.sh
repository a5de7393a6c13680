#!/usr/bin/env bash
# Second device batch: T1 host profile, the rest of the suite on GPU, AWQ and new families.
source "$(dirname "$0")/device_env.sh"
echo "=== T1 profile"
timeout 150 python3 benchmarks/profile_t1.py 2>&1 | tee "$OUT/profile_t1.txt" | head -60
echo "=== pytest engine/models on GPU"
timeout 200 python3 -m pytest -q -p no:cacheprovider tests/attention tests/engine tests/core \
  tests/models/test_equivalence.py tests/models/test_mpt.py tests/models/test_falcon.py tests/quantization 2>&1 | tee "$OUT/pytest2.txt" | tail -25
echo "=== AWQ kernels on GPU"
timeout 150 python3 benchmarks/kernels/check_awq_gpu.py 2>&1 | tee "$OUT/awq.txt" | tail -40
